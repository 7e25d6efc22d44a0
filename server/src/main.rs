use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use server::{Args, Config, config::Command};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    balancer::telemetry::init();
    match args.command {
        Some(Command::HealthCheck { addr }) => balancer::probe::exit_with_health(addr).await,
        Some(Command::Certs { out, names }) => {
            grpc_h3::certs::generate(&out, &names).map_err(|e| anyhow::anyhow!("certs: {e}"))?;
            println!("wrote {}/ca.pem, cert.pem, key.pem for {}", out.display(), names.join(", "));
            return Ok(());
        }
        None => {}
    }
    let cfg = Config::try_from(args.serve.clone()).context("--tls-cert/--tls-key")?;
    let listener = tokio::net::TcpListener::bind(args.serve.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.serve.listen))?;
    server::run(cfg, listener, balancer::signal::terminate()).await
}
