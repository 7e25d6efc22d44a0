//! The `echo.Echo` test service: client streaming and bidi streaming.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("echo");
}

use pb::{EchoMessage, echo_server::Echo};

pub struct EchoService {
    pub name: String,
}

type ChatStream = Pin<Box<dyn Stream<Item = Result<EchoMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn collect(&self, req: Request<Streaming<EchoMessage>>) -> Result<Response<EchoMessage>, Status> {
        let mut stream = req.into_inner();
        let mut texts = Vec::new();
        while let Some(m) = stream.next().await {
            texts.push(m?.text);
        }
        Ok(Response::new(EchoMessage { text: texts.join(","), server: self.name.clone() }))
    }

    type ChatStream = ChatStream;

    async fn chat(&self, req: Request<Streaming<EchoMessage>>) -> Result<Response<ChatStream>, Status> {
        let name = self.name.clone();
        let out = req.into_inner().map(move |m| m.map(|m| EchoMessage { text: m.text, server: name.clone() }));
        Ok(Response::new(Box::pin(out)))
    }
}
