//! The operator's certificate authority and the sidecars' certificates.
//!
//! The operator calls each model pod's sidecar admin port (adapter API,
//! metrics) over TLS. At start-up it ensures a CA in its own namespace (the
//! Secret `strata-ca`, keys [`CA_CERT_KEY`] and [`CA_KEY_KEY`]; ECDSA P-256,
//! 10 years): created by whichever replica comes first, read by the others,
//! so that every replica trusts the same CA. For each Model it issues a leaf
//! (1 year) for one DNS name, [`strata_core::template::sidecar_server_name`],
//! into the Model's own Secret, which the sidecars mount; the operator
//! verifies that name (never the pod IP, unknown when the Secret is made).
//!
//! Certificate building and the re-issue decision are pure functions
//! ([`Ca::generate`], [`Ca::issue`], [`needs_reissue`]); [`ensure_ca`] is the
//! only part that talks to the API server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use strata_core::labels;
pub use strata_core::template::{CA_CERT_KEY, SIDECAR_DOMAIN, TLS_CERT_KEY, TLS_KEY_KEY};

/// Key of the CA private key (PEM, PKCS#8), in the CA Secret only.
pub const CA_KEY_KEY: &str = "ca.key";
/// Default name of the CA Secret (in the operator's namespace).
pub const DEFAULT_CA_SECRET: &str = "strata-ca";

/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a sidecar certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// A sidecar certificate that expires within this is re-issued.
pub const REISSUE_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// Certificates start this much before they are made (clock skew).
const BACKDATE: Duration = Duration::from_secs(300);

/// Why a certificate could not be made, loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused.
    #[error("building a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Not PEM, or not what was expected.
    #[error("{0}")]
    Pem(String),
    /// The CA certificate and key do not belong together.
    #[error("{0}: ca.crt and ca.key do not belong together (or it is not a CA this operator made)")]
    Mismatch(String),
    /// rustls refused the CA (as a trust anchor).
    #[error("the CA as a trust anchor: {0}")]
    Rustls(#[from] rustls::Error),
    /// The API server.
    #[error("the CA Secret {secret}: {source}")]
    Kube {
        /// namespace/name.
        secret: String,
        /// Cause.
        source: kube::Error,
    },
}

/// The operator's CA: its certificate (what the operator trusts) and the
/// key that signs the sidecars' certificates.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A sidecar's certificate and key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The CA's subject and usages. Fixed: the signing side of a loaded CA is
/// rebuilt from them (and checked against its certificate).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "strata.ai");
    dn.push(DnType::CommonName, "strata sidecar CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Good only for sidecar names, whoever else comes to trust it.
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(SIDECAR_DOMAIN.into())],
        excluded_subtrees: Vec::new(),
    });
    params
}

fn pem_cert(pem: &[u8], what: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem).map_err(|e| PkiError::Pem(format!("{what}: {e}")))
}

impl Ca {
    /// A new CA (ECDSA P-256), valid for [`CA_VALIDITY`] from `now`.
    pub fn generate(now: SystemTime) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params();
        // (rcgen's time type, without naming the `time` crate.)
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(now - BACKDATE);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(now + CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(ca_params(), key),
        })
    }

    /// A CA from its PEM certificate and key, checked: a certificate it
    /// signs must verify against that CA certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = pem_cert(cert_pem.as_bytes(), CA_CERT_KEY)?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| PkiError::Pem(format!("{CA_KEY_KEY}: {e}")))?;
        let ca = Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            cert_der,
            issuer: Issuer::new(ca_params(), key),
        };
        let now = SystemTime::now();
        let probe_name = format!("probe.{SIDECAR_DOMAIN}");
        let probe = ca.issue(&probe_name, now)?;
        if !ca.verifies(probe.cert_pem.as_bytes(), &probe_name, now) {
            return Err(PkiError::Mismatch(CA_CERT_KEY.into()));
        }
        Ok(ca)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The trust anchors of a client that trusts only this CA.
    pub fn roots(&self) -> Result<rustls::RootCertStore, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone())?;
        Ok(roots)
    }

    /// A sidecar certificate for `server_name` (its only name), signed by
    /// this CA, valid for [`LEAF_VALIDITY`] from `now`, with a new key.
    pub fn issue(&self, server_name: &str, now: SystemTime) -> Result<Leaf, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "strata.ai");
        dn.push(DnType::CommonName, "strata-sidecar");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            server_name
                .to_string()
                .try_into()
                .map_err(|e| PkiError::Pem(format!("{server_name:?}: {e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(now - BACKDATE);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(now + LEAF_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Whether `cert_pem` is, at `now`, a valid certificate for
    /// `server_name` signed by this CA (what the operator's client checks).
    pub fn verifies(&self, cert_pem: &[u8], server_name: &str, now: SystemTime) -> bool {
        let (Ok(cert), Ok(name), Ok(roots)) = (
            pem_cert(cert_pem, TLS_CERT_KEY),
            ServerName::try_from(server_name.to_string()),
            self.roots(),
        ) else {
            return false;
        };
        let Ok(verifier) = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build() else {
            return false;
        };
        let t = UnixTime::since_unix_epoch(since_epoch(now));
        verifier
            .verify_server_cert(&cert, &[], &name, &[], t)
            .is_ok()
    }
}

/// Whether a Model's Secret (its `data`) needs a new sidecar certificate:
/// no certificate or key, a key that is not the certificate's, a
/// certificate that is not valid for `server_name` from this CA now or will
/// not be in [`REISSUE_BEFORE`] (expiring, another CA, another name), or a
/// `ca.crt` that is not the current CA.
pub fn needs_reissue(
    ca: &Ca,
    data: &BTreeMap<String, ByteString>,
    server_name: &str,
    now: SystemTime,
) -> bool {
    let (Some(cert), Some(key), Some(ca_cert)) = (
        data.get(TLS_CERT_KEY),
        data.get(TLS_KEY_KEY),
        data.get(CA_CERT_KEY),
    ) else {
        return true;
    };
    if ca_cert.0 != ca.cert_pem.as_bytes() {
        return true;
    }
    if !ca.verifies(&cert.0, server_name, now)
        || !ca.verifies(&cert.0, server_name, now + REISSUE_BEFORE)
    {
        return true;
    }
    // The key belongs to the certificate (else the sidecar cannot serve).
    let (Ok(cert), Ok(key)) = (
        pem_cert(&cert.0, TLS_CERT_KEY),
        PrivateKeyDer::from_pem_slice(&key.0),
    ) else {
        return true;
    };
    rustls::sign::CertifiedKey::from_der(vec![cert], key, &rustls::crypto::ring::default_provider())
        .is_err()
}

/// The sidecar entries of a Model's Secret: a new certificate for
/// `server_name`, its key, and the CA certificate.
pub fn sidecar_entries(
    ca: &Ca,
    server_name: &str,
    now: SystemTime,
) -> Result<BTreeMap<String, ByteString>, PkiError> {
    let leaf = ca.issue(server_name, now)?;
    Ok(BTreeMap::from([
        (
            TLS_CERT_KEY.to_string(),
            ByteString(leaf.cert_pem.into_bytes()),
        ),
        (
            TLS_KEY_KEY.to_string(),
            ByteString(leaf.key_pem.into_bytes()),
        ),
        (
            CA_CERT_KEY.to_string(),
            ByteString(ca.cert_pem.clone().into_bytes()),
        ),
    ]))
}

/// The CA Secret for `ca`.
pub fn ca_secret(namespace: &str, name: &str, ca: &Ca) -> Secret {
    Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                labels::MANAGED_BY.to_string(),
                labels::MANAGER.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                CA_CERT_KEY.to_string(),
                ByteString(ca.cert_pem.clone().into_bytes()),
            ),
            (
                CA_KEY_KEY.to_string(),
                ByteString(ca.key_pem.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    }
}

/// The CA in a CA Secret.
pub fn ca_from_secret(secret: &Secret) -> Result<Ca, PkiError> {
    let get = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| PkiError::Pem(format!("no {k} in the Secret")))
    };
    Ca::from_pem(&get(CA_CERT_KEY)?, &get(CA_KEY_KEY)?)
}

/// Ensures the CA Secret `namespace/name` and loads the CA from it: reads
/// it, or creates a new CA when it is absent. Two replicas starting at once
/// end up with the same CA: the one whose create loses (409) reads the
/// winner's.
pub async fn ensure_ca(client: &Client, namespace: &str, name: &str) -> Result<Ca, PkiError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let kube_err = |source| PkiError::Kube {
        secret: format!("{namespace}/{name}"),
        source,
    };
    if let Some(existing) = api.get_opt(name).await.map_err(kube_err)? {
        return ca_from_secret(&existing);
    }
    let ca = Ca::generate(SystemTime::now())?;
    match api
        .create(&PostParams::default(), &ca_secret(namespace, name, &ca))
        .await
    {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "created the sidecar CA");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Another replica made it first: use that one.
            ca_from_secret(&api.get(name).await.map_err(kube_err)?)
        }
        Err(e) => Err(kube_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "llama.default.sidecar.strata.internal";

    fn now() -> SystemTime {
        SystemTime::now()
    }

    fn data(ca: &Ca, leaf: &Leaf) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            (
                TLS_CERT_KEY.into(),
                ByteString(leaf.cert_pem.clone().into_bytes()),
            ),
            (
                TLS_KEY_KEY.into(),
                ByteString(leaf.key_pem.clone().into_bytes()),
            ),
            (
                CA_CERT_KEY.into(),
                ByteString(ca.cert_pem().as_bytes().to_vec()),
            ),
        ])
    }

    #[test]
    fn a_leaf_verifies_for_its_name_and_its_ca_only() {
        let ca = Ca::generate(now()).expect("ca");
        let leaf = ca.issue(NAME, now()).expect("leaf");
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
        assert!(ca.verifies(leaf.cert_pem.as_bytes(), NAME, now()));
        assert!(
            !ca.verifies(
                leaf.cert_pem.as_bytes(),
                "other.default.sidecar.strata.internal",
                now()
            ),
            "another Model's name"
        );
        assert!(
            !ca.verifies(leaf.cert_pem.as_bytes(), "127.0.0.1", now()),
            "an IP"
        );
        let other = Ca::generate(now()).expect("ca");
        assert!(
            !other.verifies(leaf.cert_pem.as_bytes(), NAME, now()),
            "another CA"
        );
        // Expired after a year, not valid before it was made.
        assert!(!ca.verifies(
            leaf.cert_pem.as_bytes(),
            NAME,
            now() + LEAF_VALIDITY + Duration::from_secs(3600)
        ));
        assert!(!ca.verifies(
            leaf.cert_pem.as_bytes(),
            NAME,
            now() - Duration::from_secs(3600)
        ));
    }

    #[test]
    fn the_ca_is_constrained_to_sidecar_names() {
        let ca = Ca::generate(now()).expect("ca");
        let leaf = ca.issue("www.example.com", now()).expect("leaf");
        assert!(
            !ca.verifies(leaf.cert_pem.as_bytes(), "www.example.com", now()),
            "outside {SIDECAR_DOMAIN}"
        );
    }

    #[test]
    fn a_ca_round_trips_through_its_secret_and_signs_the_same() {
        let ca = Ca::generate(now()).expect("ca");
        let secret = ca_secret("strata-system", DEFAULT_CA_SECRET, &ca);
        assert_eq!(secret.metadata.name.as_deref(), Some("strata-ca"));
        let loaded = ca_from_secret(&secret).expect("loaded");
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.cert_der(), ca.cert_der());
        // What the loaded CA signs, the original CA certificate accepts.
        let leaf = loaded.issue(NAME, now()).expect("leaf");
        assert!(ca.verifies(leaf.cert_pem.as_bytes(), NAME, now()));
        assert!(format!("{loaded:?}").len() < 40, "no key in Debug");
    }

    #[test]
    fn a_ca_whose_key_is_not_its_own_is_refused() {
        let a = Ca::generate(now()).expect("ca");
        let b = Ca::generate(now()).expect("ca");
        let err = Ca::from_pem(a.cert_pem(), &b.key_pem).expect_err("mismatch");
        assert!(matches!(err, PkiError::Mismatch(_)), "{err}");
        assert!(Ca::from_pem("not pem", &a.key_pem).is_err());
        assert!(Ca::from_pem(a.cert_pem(), "not pem").is_err());
        let mut secret = ca_secret("ns", "strata-ca", &a);
        secret.data.as_mut().expect("data").remove(CA_KEY_KEY);
        assert!(ca_from_secret(&secret).is_err());
    }

    #[test]
    fn reissue_only_when_missing_expiring_foreign_or_broken() {
        let t = now();
        let ca = Ca::generate(t).expect("ca");
        let leaf = ca.issue(NAME, t).expect("leaf");
        let good = data(&ca, &leaf);
        assert!(!needs_reissue(&ca, &good, NAME, t), "fresh");
        assert!(
            !needs_reissue(
                &ca,
                &good,
                NAME,
                t + LEAF_VALIDITY - REISSUE_BEFORE - Duration::from_secs(86_400)
            ),
            "31 days before it expires"
        );
        assert!(
            needs_reissue(
                &ca,
                &good,
                NAME,
                t + LEAF_VALIDITY - REISSUE_BEFORE + Duration::from_secs(86_400)
            ),
            "29 days before it expires"
        );
        assert!(
            needs_reissue(&ca, &good, NAME, t + LEAF_VALIDITY * 2),
            "expired"
        );
        assert!(
            needs_reissue(&ca, &good, "other.default.sidecar.strata.internal", t),
            "another name (the Model was renamed or moved)"
        );
        for missing in [TLS_CERT_KEY, TLS_KEY_KEY, CA_CERT_KEY] {
            let mut d = good.clone();
            d.remove(missing);
            assert!(needs_reissue(&ca, &d, NAME, t), "without {missing}");
        }
        assert!(
            needs_reissue(&ca, &BTreeMap::new(), NAME, t),
            "a token-only Secret"
        );
        // Signed by another CA (the CA Secret was replaced).
        let other = Ca::generate(t).expect("ca");
        let foreign = data(&other, &other.issue(NAME, t).expect("leaf"));
        assert!(needs_reissue(&ca, &foreign, NAME, t));
        // The right certificate with the previous CA's ca.crt.
        let mut stale_ca = good.clone();
        stale_ca.insert(
            CA_CERT_KEY.into(),
            ByteString(other.cert_pem().as_bytes().to_vec()),
        );
        assert!(needs_reissue(&ca, &stale_ca, NAME, t));
        // A key that is not the certificate's.
        let mut wrong_key = good.clone();
        wrong_key.insert(
            TLS_KEY_KEY.into(),
            ByteString(ca.issue(NAME, t).expect("leaf").key_pem.into_bytes()),
        );
        assert!(needs_reissue(&ca, &wrong_key, NAME, t));
        let mut garbage = good.clone();
        garbage.insert(TLS_CERT_KEY.into(), ByteString(b"garbage".to_vec()));
        assert!(needs_reissue(&ca, &garbage, NAME, t));
    }

    #[test]
    fn sidecar_entries_hold_a_fresh_leaf_and_the_ca() {
        let t = now();
        let ca = Ca::generate(t).expect("ca");
        let d = sidecar_entries(&ca, NAME, t).expect("entries");
        assert_eq!(
            d.keys().map(String::as_str).collect::<Vec<_>>(),
            [CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY]
        );
        assert!(!needs_reissue(&ca, &d, NAME, t));
    }
}
