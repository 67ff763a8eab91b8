//! The client against a PodResources server on a real Unix socket: the
//! answers arrive whole; a server that stalls is cut at the timeout; an
//! answer over the size limit is refused, not buffered; a missing socket is
//! a clear error.

use std::path::PathBuf;
use std::time::Duration;

use strata_podresources::v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use strata_podresources::{
    Client, Error, MAX_MESSAGE_BYTES, PodResourcesLister, PodResourcesListerServer, device_holders,
    is_nvidia_gpu,
};
use tonic::{Request, Response, Status};

#[derive(Clone)]
struct Node {
    pods: usize,
    name_len: usize,
    stall: Option<Duration>,
}

#[tonic::async_trait]
impl PodResourcesLister for Node {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        if let Some(d) = self.stall {
            tokio::time::sleep(d).await;
        }
        let pod_resources = (0..self.pods)
            .map(|i| PodResources {
                name: format!("{}{i}", "p".repeat(self.name_len)),
                namespace: "ns".into(),
                containers: vec![ContainerResources {
                    name: "engine".into(),
                    devices: vec![ContainerDevices {
                        resource_name: "nvidia.com/gpu".into(),
                        device_ids: vec![format!("GPU-{i}")],
                        topology: None,
                    }],
                    ..ContainerResources::default()
                }],
            })
            .collect();
        Ok(Response::new(ListPodResourcesResponse { pod_resources }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Ok(Response::new(AllocatableResourcesResponse {
            devices: vec![ContainerDevices {
                resource_name: "nvidia.com/gpu".into(),
                device_ids: (0..8).map(|i| format!("GPU-{i}")).collect(),
                topology: None,
            }],
            ..AllocatableResourcesResponse::default()
        }))
    }

    async fn get(
        &self,
        _: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
}

async fn serve(node: Node) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubelet.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(node))
            .serve_with_incoming(incoming),
    );
    (dir, path)
}

#[tokio::test]
async fn list_and_allocatable_over_the_socket() {
    let (_dir, path) = serve(Node {
        pods: 3,
        name_len: 4,
        stall: None,
    })
    .await;
    let mut client = Client::connect(&path, Duration::from_secs(5))
        .await
        .expect("connect");
    let list = client.list().await.expect("list");
    let holders = device_holders(&list, is_nvidia_gpu);
    assert_eq!(holders.len(), 3);
    assert_eq!(holders["GPU-2"].pod, "pppp2");
    let alloc = client.allocatable().await.expect("allocatable");
    assert_eq!(alloc.devices[0].device_ids.len(), 8);
}

#[tokio::test]
async fn a_stalled_kubelet_is_cut_at_the_timeout() {
    let (_dir, path) = serve(Node {
        pods: 1,
        name_len: 1,
        stall: Some(Duration::from_secs(30)),
    })
    .await;
    let mut client = Client::connect(&path, Duration::from_millis(300))
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let err = client.list().await.expect_err("times out");
    assert!(
        matches!(&err, Error::Call { call: "List", status } if status.code() == tonic::Code::Cancelled || status.code() == tonic::Code::DeadlineExceeded),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
}

#[tokio::test]
async fn an_answer_over_the_size_limit_is_refused() {
    // About 20 MiB of pod names.
    let (_dir, path) = serve(Node {
        pods: 80,
        name_len: 256 * 1024,
        stall: None,
    })
    .await;
    let mut client = Client::connect(&path, Duration::from_secs(20))
        .await
        .expect("connect");
    let err = client.list().await.expect_err("too large");
    assert!(
        matches!(&err, Error::Call { status, .. } if status.code() == tonic::Code::OutOfRange || status.message().contains("message length too large")),
        "{err} (limit {MAX_MESSAGE_BYTES})"
    );
}

#[tokio::test]
async fn a_missing_socket_says_which() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.sock");
    let err = Client::connect(&path, Duration::from_secs(1))
        .await
        .expect_err("no socket");
    assert!(err.to_string().contains("absent.sock"), "{err}");
}
