//! `grpc.health.v1.Health/Check` from the command line, for container healthchecks.

use std::{net::SocketAddr, time::Duration};

use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Checks `addr` and exits 0 when it is SERVING, 1 otherwise, printing one line.
pub async fn exit_with_health(addr: SocketAddr) -> ! {
    match check(addr).await {
        Ok(ServingStatus::Serving) => std::process::exit(0),
        Ok(status) => {
            eprintln!("{addr}: {}", status.as_str_name());
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("{addr}: {e}");
            std::process::exit(1)
        }
    }
}

async fn check(addr: SocketAddr) -> Result<ServingStatus, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2));
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e}"))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().status())
}
