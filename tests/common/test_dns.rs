//! A real DNS server (hickory-server) on a loopback UDP port answering from a table the test
//! fills: MX, A and AAAA records, null MX, names that are NXDOMAIN, names that SERVFAIL.
//! Names not in the table answer NOERROR with no records (the name "exists").
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

#[derive(Default)]
pub struct Table {
    records: HashMap<(String, RecordType), Vec<Record>>,
    nxdomain: HashSet<String>,
    servfail: HashSet<String>,
    /// Every query received: (name, type).
    pub queries: Vec<(String, RecordType)>,
}

fn key(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.').to_ascii_lowercase())
}

fn name(n: &str) -> Name {
    Name::from_ascii(key(n)).expect("valid DNS name")
}

#[derive(Clone, Default)]
pub struct Zone(Arc<Mutex<Table>>);

impl Zone {
    pub fn mx(&self, domain: &str, preference: u16, exchange: &str) -> &Self {
        let exchange = if exchange == "." {
            Name::root()
        } else {
            name(exchange)
        };
        let r = Record::from_rdata(name(domain), 60, RData::MX(MX::new(preference, exchange)));
        self.add(domain, RecordType::MX, r)
    }

    /// RFC 7505 null MX: a single MX of preference 0 with the root as exchange.
    pub fn null_mx(&self, domain: &str) -> &Self {
        self.mx(domain, 0, ".")
    }

    pub fn addr(&self, host: &str, ip: IpAddr) -> &Self {
        match ip {
            IpAddr::V4(v4) => {
                let r = Record::from_rdata(name(host), 60, RData::A(A(v4)));
                self.add(host, RecordType::A, r)
            }
            IpAddr::V6(v6) => {
                let r = Record::from_rdata(name(host), 60, RData::AAAA(AAAA(v6)));
                self.add(host, RecordType::AAAA, r)
            }
        }
    }

    pub fn nxdomain(&self, n: &str) -> &Self {
        self.0.lock().unwrap().nxdomain.insert(key(n));
        self
    }

    pub fn servfail(&self, n: &str) -> &Self {
        self.0.lock().unwrap().servfail.insert(key(n));
        self
    }

    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.0.lock().unwrap().queries.clone()
    }

    fn add(&self, n: &str, t: RecordType, r: Record) -> &Self {
        self.0
            .lock()
            .unwrap()
            .records
            .entry((key(n), t))
            .or_default()
            .push(r);
        self
    }
}

struct Handler(Zone);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let (qname, qtype) = match request.request_info() {
            Ok(info) => (info.query.name().to_string(), info.query.query_type()),
            Err(_) => (String::new(), RecordType::A),
        };
        let qname = key(&qname);
        let (code, answers) = {
            let mut t = self.0.0.lock().unwrap();
            t.queries.push((qname.clone(), qtype));
            if t.servfail.contains(&qname) {
                (ResponseCode::ServFail, vec![])
            } else if t.nxdomain.contains(&qname) {
                (ResponseCode::NXDomain, vec![])
            } else {
                (
                    ResponseCode::NoError,
                    t.records.get(&(qname, qtype)).cloned().unwrap_or_default(),
                )
            }
        };
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        meta.response_code = code;
        let builder = MessageResponseBuilder::from_message_request(request);
        let response = builder.build(meta, answers.iter(), [], [], []);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => panic!("test DNS server could not answer: {e}"),
        }
    }
}

/// The running server; dropping it stops it.
pub struct TestDns {
    pub addr: SocketAddr,
    pub zone: Zone,
    _server: Server<Handler>,
}

impl TestDns {
    pub async fn start() -> Self {
        let zone = Zone::default();
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind DNS socket");
        let addr = socket.local_addr().expect("local addr");
        let mut server = Server::new(Handler(zone.clone()));
        server.register_socket(socket);
        Self {
            addr,
            zone,
            _server: server,
        }
    }
}
