//! A slice-api on 127.0.0.1:0 with a hub the test feeds, and a kube client for it.

#![allow(dead_code)] // each test binary uses part of it

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use slice_api::hub::Hub;
use slice_api::store::Store;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const SERVER: &str = "kubernetes.io/service-name=server";

/// A running server; dropping it stops it.
pub struct Api {
    pub hub: Arc<Hub>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Api {
    /// Serves a new store (versions from `start`, `history` changes kept) on a free port.
    pub async fn start(start: u64, history: usize) -> Api {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hub = Arc::new(Hub::new(Store::new("default", start, history), 256));
        hub.mark_synced();
        Api::serve(listener, hub)
    }

    /// Serves `hub` on `listener`, with a bookmark every 200 ms.
    pub fn serve(listener: TcpListener, hub: Arc<Hub>) -> Api {
        init_tracing();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(slice_api::serve(listener, hub.clone(), Duration::from_millis(200), async {
            let _ = stopped.await;
        }));
        Api { hub, addr, stop: Some(stop), task }
    }

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Stops the server and waits until its port is free.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The slice slice-api would publish for `service`, with an endpoint per IP.
pub fn slice(service: &str, ips: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-sandbox")),
            labels: Some([("kubernetes.io/service-name".to_string(), service.to_string())].into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: ips.iter().map(|ip| Endpoint { addresses: vec![ip.to_string()], ..Endpoint::default() }).collect(),
        ports: None,
    }
}

/// Logs at RUST_LOG (e.g. `RUST_LOG=slice_api=debug` shows every request line).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}
