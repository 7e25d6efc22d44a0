//! A real DNS server on UDP, answering A and AAAA queries from a table the test edits.
//! Answers carry TTL 600 like Docker's embedded DNS, so a resolver that honoured TTLs
//! would miss every change.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use tokio::net::UdpSocket;

type Table = Arc<Mutex<HashMap<String, Vec<IpAddr>>>>;

pub struct Dns {
    addr: SocketAddr,
    table: Table,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    /// Listens on `ip` at a free port.
    pub async fn start(ip: IpAddr) -> Dns {
        let socket = UdpSocket::bind((ip, 0)).await.expect("binding the test DNS server");
        let addr = socket.local_addr().unwrap();
        let table = Table::default();
        let task = tokio::spawn(serve(socket, table.clone()));
        Dns { addr, table, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the addresses of `name`; an empty list makes it NXDOMAIN.
    pub fn set(&self, name: &str, ips: &[IpAddr]) {
        let mut table = self.table.lock().unwrap();
        if ips.is_empty() {
            table.remove(&normalize(name));
        } else {
            table.insert(normalize(name), ips.to_vec());
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

async fn serve(socket: UdpSocket, table: Table) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
        let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
        let reply = answer(&query, &table);
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

fn answer(query: &Message, table: &Table) -> Message {
    let mut reply = Message::new(query.metadata.id, MessageType::Response, query.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(query.queries.iter().cloned());
    let table = table.lock().unwrap();
    for q in &query.queries {
        let Some(ips) = table.get(&normalize(&q.name().to_ascii())) else {
            reply.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        for ip in ips {
            let rdata = match (ip, q.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(*v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(q.name().clone(), 600, rdata));
        }
    }
    reply
}
