//! A DNS responder on each network's gateway: the name of a group of that
//! network answers with its address, as ACI's DNS name labels do; other
//! names go to the upstream servers, when the network has egress and
//! there are any.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

/// Answers about groups may change: keep them short-lived.
const TTL_SECONDS: u32 = 5;
const UPSTREAM_PATIENCE: Duration = Duration::from_secs(3);
/// Forwarded queries in flight at once; more are dropped (clients retry).
const FORWARDS: usize = 64;

type Names = Arc<RwLock<HashMap<String, Ipv4Addr>>>;

/// Must run inside the network's runtime.
pub fn serve(
    socket: std::net::UdpSocket,
    names: Names,
    upstream: Vec<SocketAddr>,
) -> std::io::Result<tokio::task::AbortHandle> {
    socket.set_nonblocking(true)?;
    let socket = Arc::new(UdpSocket::from_std(socket)?);
    let forwards = Arc::new(Semaphore::new(FORWARDS));
    let task = tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        loop {
            let Ok((n, client)) = socket.recv_from(&mut buffer).await else {
                continue;
            };
            match answer(&buffer[..n], &names, !upstream.is_empty()) {
                Reply::Local(bytes) => {
                    let _ = socket.send_to(&bytes, client).await;
                }
                Reply::Forward => {
                    let Ok(permit) = forwards.clone().try_acquire_owned() else {
                        continue;
                    };
                    let query = buffer[..n].to_vec();
                    let (socket, upstream) = (socket.clone(), upstream.clone());
                    tokio::spawn(async move {
                        if let Some(bytes) = forward(&query, &upstream).await {
                            let _ = socket.send_to(&bytes, client).await;
                        }
                        drop(permit);
                    });
                }
                Reply::Nothing => {}
            }
        }
    });
    Ok(task.abort_handle())
}

enum Reply {
    Local(Vec<u8>),
    Forward,
    /// Not a query we can read: no answer, as for any garbage.
    Nothing,
}

fn answer(packet: &[u8], names: &Names, can_forward: bool) -> Reply {
    let Ok(query) = Message::from_vec(packet) else {
        return Reply::Nothing;
    };
    if query.message_type() != MessageType::Query {
        return Reply::Nothing;
    }
    let [question] = query.queries() else {
        return respond(&query, ResponseCode::FormErr, None);
    };
    let name = question
        .name()
        .to_utf8()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let address = names
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&name)
        .copied();
    match address {
        Some(address) => {
            let record = (question.query_type() == RecordType::A).then(|| {
                Record::from_rdata(question.name().clone(), TTL_SECONDS, RData::A(A(address)))
            });
            respond(&query, ResponseCode::NoError, record)
        }
        None if can_forward => Reply::Forward,
        None => respond(&query, ResponseCode::NXDomain, None),
    }
}

fn respond(query: &Message, code: ResponseCode, record: Option<Record>) -> Reply {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .set_response_code(code);
    response.add_queries(query.queries().to_vec());
    if let Some(record) = record {
        response.add_answer(record);
    }
    response
        .to_vec()
        .map(Reply::Local)
        .unwrap_or(Reply::Nothing)
}

async fn forward(query: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    for server in upstream {
        let any = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let Ok(socket) = UdpSocket::bind(any).await else {
            continue;
        };
        if socket.send_to(query, server).await.is_err() {
            continue;
        }
        let mut buffer = vec![0u8; 4096];
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(UPSTREAM_PATIENCE, socket.recv_from(&mut buffer)).await
        {
            if from == *server {
                buffer.truncate(n);
                return Some(buffer);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn ask(name: &str, kind: RecordType, names: &Names, can_forward: bool) -> Option<Message> {
        let mut query = Message::new();
        query
            .set_id(7)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_str(name).unwrap(), kind));
        match answer(&query.to_vec().unwrap(), names, can_forward) {
            Reply::Local(bytes) => Some(Message::from_vec(&bytes).unwrap()),
            Reply::Forward => None,
            Reply::Nothing => panic!("no reply to {name}"),
        }
    }

    #[test]
    fn group_names_answer_and_others_are_forwarded_or_unknown() {
        let names: Names = Arc::default();
        names
            .write()
            .unwrap()
            .insert("web".into(), Ipv4Addr::new(10, 88, 0, 2));
        let reply = ask("WEB.", RecordType::A, &names, true).unwrap();
        assert_eq!(reply.id(), 7);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert_eq!(
            reply.answers()[0].data(),
            &RData::A(A(Ipv4Addr::new(10, 88, 0, 2)))
        );
        let v6 = ask("web.", RecordType::AAAA, &names, true).unwrap();
        assert!(v6.answers().is_empty() && v6.response_code() == ResponseCode::NoError);
        assert!(ask("example.org.", RecordType::A, &names, true).is_none());
        let unknown = ask("example.org.", RecordType::A, &names, false).unwrap();
        assert_eq!(unknown.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn garbage_gets_no_answer() {
        let names: Names = Arc::default();
        for packet in [&b""[..], b"\x00\x01", &[0xff; 64]] {
            assert!(matches!(answer(packet, &names, true), Reply::Nothing));
        }
    }
}
