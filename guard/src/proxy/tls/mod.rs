//! TLS connections: intercepted when a policy names the server (by SNI or by destination) or
//! `tls.intercept = "all"` — terminated with a leaf minted by guard's CA ([`ca`]) and served as
//! HTTP towards a verified upstream TLS connection — else passed through byte for byte once the
//! SNI ([`hello`]) is known to belong to the destination (no domain fronting).

pub mod ca;
pub mod hello;

pub use ca::{ca_init, server_name, upstream_config, CaFiles, Interceptor};

use std::time::Duration;

use serde_json::json;
use tokio::net::TcpStream;

use super::{connection::ConnectionRecord, fairness::Hold, http, identify::Connection, tcp, Proxy};
use crate::{audit::ServerRef, config::Intercept, net::canonical_addr};

impl Proxy {
    /// TLS: intercept, pass through, or refuse; `upstream` is a TCP connection to the
    /// destination made while waiting for the client, if any.
    pub(super) async fn handle_tls(
        &self,
        client: TcpStream,
        conn: Connection,
        upstream: Option<TcpStream>,
        mut rec: ConnectionRecord<'_>,
        hold: Hold,
    ) {
        let dst = conn.original_dst;
        let hello = match hello::peek_client_hello(&client, self.settings.header_timeout).await {
            Ok(h) => h,
            Err(e) => {
                rec.deny("tls", format!("no valid TLS ClientHello: {e}"));
                return rec.refuse(client);
            }
        };
        let sni = hello.sni.clone();
        let policies = self.http.engine.policies();
        // By SNI, else by destination: an address a policy's server resolves to is that
        // server's whatever SNI (or none) the agent sends.
        let chosen = policies
            .match_sni(sni.as_deref(), dst)
            .map(|s| s.name.clone());
        let server = self.named.decide(dst, chosen, None);
        let intercept = server.is_some() || self.settings.intercept == Intercept::All;
        rec.record.server = Some(ServerRef {
            name: server.clone(),
            host: sni.clone().unwrap_or_else(|| dst.ip().to_string()),
            port: dst.port(),
            command: None,
        });
        rec.record.detail = Some(json!({
            "sni": sni, "alpn": hello.alpn, "intercepted": intercept,
        }));
        if !intercept {
            return self.tls_passthrough(client, dst, sni, upstream, rec).await;
        }
        let names = Names { sni, server };
        self.intercept(client, conn, names, upstream, rec, hold)
            .await;
    }

    /// Passthrough: the bytes go on untouched, once the SNI (if any) is known to be a name of
    /// the destination (no domain fronting).
    async fn tls_passthrough(
        &self,
        client: TcpStream,
        dst: std::net::SocketAddr,
        sni: Option<String>,
        upstream: Option<TcpStream>,
        mut rec: ConnectionRecord<'_>,
    ) {
        if let Some(name) = &sni {
            let problem = match hello::resolves_to(name, dst).await {
                Ok(true) => None,
                Ok(false) => Some(format!(
                    "SNI {name} does not resolve to the destination {} (domain fronting)",
                    dst.ip()
                )),
                Err(e) => Some(format!(
                    "SNI {name} could not be checked against the destination: {e}"
                )),
            };
            if let Some(reason) = problem {
                rec.deny("tls.sni", reason);
                return rec.refuse(client);
            }
        }
        rec.record.rule = Some("tls.passthrough".into());
        let Some((mut client, mut upstream)) = self.go_on(client, upstream, dst, &mut rec).await
        else {
            return;
        };
        let _ = tcp::passthrough(&mut client, &mut upstream).await;
    }

    /// Interception: TLS with the agent under a leaf minted for the name it asked for, HTTP
    /// served over it, and a verified TLS connection (or a pooled one) upstream.
    async fn intercept(
        &self,
        client: TcpStream,
        conn: Connection,
        Names { sni, server }: Names,
        upstream: Option<TcpStream>,
        mut rec: ConnectionRecord<'_>,
        hold: Hold,
    ) {
        let dst = conn.original_dst;
        let name = sni
            .clone()
            .unwrap_or_else(|| canonical_addr(dst).ip().to_string());
        let accepted = match self.interceptor.server_config(&name) {
            Ok(cfg) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(client))
                    .await
                    .map_err(|_| "TLS handshake with the agent timed out".to_string())
                    .and_then(|r| {
                        r.map_err(|e| format!("TLS handshake with the agent failed: {e}"))
                    })
            }
            Err(e) => Err(format!("minting a certificate for {name}: {e:#}")),
        };
        let tls_client = match accepted {
            Ok(s) => s,
            // The handshake took the client: it is closed as it is dropped.
            Err(reason) => return rec.deny("tls", reason),
        };
        let alpn_h2 = tls_client.get_ref().1.alpn_protocol() == Some(b"h2");
        let server_name = match server_name(sni.as_deref(), canonical_addr(dst)) {
            Ok(n) => n,
            Err(e) => return rec.deny("tls", format!("{e:#}")),
        };
        rec.record.rule = Some("tls.intercept".into());
        if let Some(detail) = rec.record.detail.as_mut() {
            detail["alpn_chosen"] = json!(if alpn_h2 { "h2" } else { "http/1.1" });
        }
        if !rec.commit() {
            return;
        }
        let pool = http::PoolKey {
            dst,
            name: server_name.to_str().into_owned(),
            uid: conn.identity.uid,
            cgroup_id: conn.identity.cgroup_id,
        };
        let connector = http::Connector::Tls {
            name: server_name,
            config: self.interceptor.upstream(),
        };
        let upstream = http::Upstream::new(dst, connector, upstream).pooled(pool);
        http::serve(
            self.http.clone(),
            conn,
            tls_client,
            upstream,
            alpn_h2,
            server,
            hold,
        )
        .await;
    }
}

/// Who an intercepted connection is for: the name the agent asked for (SNI), and the
/// policy-named server it is, if any.
struct Names {
    sni: Option<String>,
    server: Option<String>,
}
