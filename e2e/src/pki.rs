//! The cluster's PKI: one CA, the API server's serving certificate, client
//! certificates for each identity, and the service-account signing key.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Result, io_err};

/// Paths of the generated files.
#[derive(Debug, Clone)]
pub struct Pki {
    /// Directory holding everything.
    pub dir: PathBuf,
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// API server serving certificate and key.
    pub apiserver: CertPair,
    /// Service-account token signing key (PKCS#8 PEM, ECDSA P-256).
    pub service_account_key: PathBuf,
    /// Its public key (PEM), for verifying tokens.
    pub service_account_pub: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// Certificate.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Issues certificates from the cluster CA.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(io_err(path))
}

fn dn(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

impl Authority {
    /// Creates a CA in `dir` and the files every cluster needs.
    pub fn create(dir: &Path, service_ip: IpAddr) -> Result<(Self, Pki)> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("strata-e2e-ca", None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = params.self_signed(&ca_key)?;
        let ca_cert_path = dir.join("ca.crt");
        write(&ca_cert_path, &ca_cert.pem())?;
        write(&dir.join("ca.key"), &ca_key.serialize_pem())?;
        let authority = Self {
            issuer: Issuer::new(params, ca_key),
            dir: dir.to_path_buf(),
        };

        let mut sans = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(service_ip),
        ];
        for name in [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            sans.push(SanType::DnsName(name.try_into()?));
        }
        let apiserver = authority.issue("kube-apiserver", "kube-apiserver", None, sans, true)?;

        let sa_key = KeyPair::generate()?;
        let service_account_key = dir.join("service-account.key");
        write(&service_account_key, &sa_key.serialize_pem())?;
        let service_account_pub = dir.join("service-account.pub");
        write(&service_account_pub, &sa_key.public_key_pem())?;

        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_cert: ca_cert_path,
            apiserver,
            service_account_key,
            service_account_pub,
        };
        Ok((authority, pki))
    }

    /// Issues a client certificate for a user (CN) in groups (O).
    pub fn client(&self, file: &str, user: &str, group: Option<&str>) -> Result<CertPair> {
        self.issue(file, user, group, Vec::new(), false)
    }

    fn issue(
        &self,
        file: &str,
        common_name: &str,
        organization: Option<&str>,
        sans: Vec<SanType>,
        server: bool,
    ) -> Result<CertPair> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, organization);
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if server {
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let cert = params.signed_by(&key, &self.issuer)?;
        let pair = CertPair {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        write(&pair.cert, &cert.pem())?;
        write(&pair.key, &key.serialize_pem())?;
        Ok(pair)
    }
}

/// Writes a kubeconfig for `server` that authenticates with `client`.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    client: &CertPair,
    user: &str,
) -> Result<()> {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: strata-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: strata-e2e
  context:
    cluster: strata-e2e
    user: {user}
current-context: strata-e2e
",
        ca = ca.display(),
        cert = client.cert.display(),
        key = client.key.display(),
    );
    write(path, &text)
}
