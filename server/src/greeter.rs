//! The `hello.HelloService` implementation: greetings that say which replica answered,
//! with optional injected faults and latency.

use std::{net::SocketAddr, pin::Pin, sync::Arc};

use proto::{HelloRequest, HelloResponse, HelloStreamRequest, hello_service_server::HelloService};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{
    Request, Response, Status,
    metadata::{MetadataMap, MetadataValue},
};

use crate::config::Config;

/// One replica's greeter. `draining` turns true on SIGTERM, which ends unbounded
/// streams at once so their callers can resume elsewhere without waiting for the drain
/// deadline.
#[derive(Clone)]
pub struct Greeter {
    cfg: Arc<Config>,
    draining: watch::Receiver<bool>,
}

impl Greeter {
    pub fn new(cfg: Arc<Config>, draining: watch::Receiver<bool>) -> Self {
        Greeter { cfg, draining }
    }

    fn reply(&self, name: &str, local: Option<SocketAddr>, seq: u64) -> HelloResponse {
        let address = local.map(|a| a.to_string()).unwrap_or_default();
        let (ip, port) = local.map_or((String::new(), 0), |a| (a.ip().to_string(), a.port()));
        HelloResponse {
            message: format!(
                "Hello, {name}! (from server {} on {}, IP: {ip}, port: {port})",
                self.cfg.name, self.cfg.node
            ),
            server: self.cfg.name.clone(),
            node: self.cfg.node.clone(),
            address,
            seq,
        }
    }

    /// Waits `--delay-ms`, then fails this call with `--fail-code` at `--fail-rate`, or
    /// with UNAVAILABLE while sick.
    async fn inject(&self) -> Result<(), Status> {
        if !self.cfg.delay.is_zero() {
            tokio::time::sleep(self.cfg.delay).await;
        }
        if *self.cfg.sick.borrow() {
            return Err(Status::unavailable(format!("server {} is sick (NOT_SERVING)", self.cfg.name)));
        }
        if self.cfg.fail_rate > 0.0 && fastrand::f64() < self.cfg.fail_rate {
            let mut md = MetadataMap::new();
            if let Ok(v) = self.cfg.name.parse() {
                md.insert("x-injected-by", v);
            }
            if let Some(ms) = self.cfg.fail_pushback_ms {
                md.insert("grpc-retry-pushback-ms", ms.into());
            }
            let msg = format!("injected fault from server {}", self.cfg.name);
            return Err(Status::with_metadata(self.cfg.fail_code, msg, md));
        }
        Ok(())
    }
}

type HelloStream = Pin<Box<dyn Stream<Item = Result<HelloResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HelloService for Greeter {
    async fn say_hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        let local = req.local_addr();
        let protocol = if req.extensions().get::<grpc_h3::server::Http3>().is_some() { "h3" } else { "h2" };
        self.inject().await?;
        let mut resp = Response::new(self.reply(&req.get_ref().name, local, 0));
        // Which protocol carried the call, for tests and curious users (grpcurl -v).
        resp.metadata_mut().insert("x-served-over", MetadataValue::from_static(protocol));
        Ok(resp)
    }

    type SayHelloStreamStream = HelloStream;

    async fn say_hello_stream(
        &self,
        req: Request<HelloStreamRequest>,
    ) -> Result<Response<Self::SayHelloStreamStream>, Status> {
        let local = req.local_addr();
        self.inject().await?;
        let r = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(self.clone().stream(r, local, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Greeter {
    async fn stream(
        mut self,
        r: HelloStreamRequest,
        local: Option<SocketAddr>,
        tx: mpsc::Sender<Result<HelloResponse, Status>>,
    ) {
        let interval = std::time::Duration::from_millis(r.interval_ms.into());
        let last = (r.count > 0).then_some(u64::from(r.count));
        let mut seq = r.resume_after;
        while last.is_none_or(|last| seq < last) {
            let draining = async {
                let _ = self.draining.wait_for(|d| *d).await;
            };
            tokio::select! {
                _ = draining, if last.is_none() => {
                    let msg = format!("server {} is draining; re-open with resume_after={seq}", self.cfg.name);
                    let _ = tx.send(Err(Status::unavailable(msg))).await;
                    return;
                }
                _ = tokio::time::sleep(interval + self.cfg.delay) => {}
            }
            seq += 1;
            if tx.send(Ok(self.reply(&r.name, local, seq))).await.is_err() {
                return; // the caller went away
            }
        }
    }
}
