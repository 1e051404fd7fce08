//! A bare Pingora pass-through proxy: the baseline outrider's own per-request cost is measured
//! against (`scripts/bench.sh`). Usage: `bare_pingora LISTEN UPSTREAM` (both `ip:port`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstream: std::net::SocketAddr,
    /// With `BARE_TIMEOUTS=1`, per-read/write upstream timeouts like outrider sets.
    timeouts: bool,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        if self.timeouts {
            peer.options.connection_timeout = Some(std::time::Duration::from_secs(1));
            peer.options.read_timeout = Some(std::time::Duration::from_secs(30));
            peer.options.write_timeout = Some(std::time::Duration::from_secs(30));
        }
        Ok(Box::new(peer))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18100".into());
    let upstream = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18001".into())
        .parse()
        .unwrap_or_else(|e| panic!("upstream must be ip:port: {e}"));
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora_proxy::http_proxy_service(
        &server.configuration,
        Bare {
            upstream,
            timeouts: std::env::var("BARE_TIMEOUTS").is_ok_and(|v| v == "1"),
        },
    );
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
