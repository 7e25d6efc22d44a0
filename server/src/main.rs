use anyhow::Context;
use clap::Parser;
use server::{Args, Config, config::Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    balancer::telemetry::init();
    if let Some(Command::HealthCheck { addr }) = args.command {
        balancer::probe::exit_with_health(addr).await;
    }
    let listener = tokio::net::TcpListener::bind(args.serve.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.serve.listen))?;
    server::run(Config::from(args.serve), listener, balancer::signal::terminate()).await
}
