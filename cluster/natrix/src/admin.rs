//! The relay's admin API (`--admin-listen`, off by default; every request
//! needs `Authorization: Bearer <--admin-token>`), what coturn's CLI is
//! used for most: list allocations (by user, session, tenant, peer, client),
//! kill one, drain the relay, show the quotas in use. `natrix admin` is its
//! client.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /admin/allocations?user=&session=&tenant=&peer=&client=` | `{"count", "allocations": [...]}` |
//! | `DELETE /admin/allocations/{relayed address}?client=IP:PORT` | `{"killed": true}`, or 404 (`client` only for a shared relayed address) |
//! | `POST /admin/drain` | 202 `{"draining": true}` |
//! | `GET /admin/quotas` | counts, free ports, configured caps, top holders |
//!
//! A source (an IPv4 address, an IPv6 /64) gets [`REFUSALS_PER_MINUTE`]
//! refused requests (401, each logged) a minute; past them every request
//! of its gets 429 before the token is read, without a log line, until the
//! minute is over — guessing the token, or flooding the log, goes nowhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context;
use natrix_relay::config::RelayConfig;
use natrix_relay::control::{AdminAnswer, AdminQuery, Control};
use natrix_telemetry::Telemetry;
use natrix_telemetry::catalogue as cat;
use prometheus::IntCounterVec;
use serde_json::json;
use tracing::warn;

use crate::cli::{AdminArgs, Global};

/// How long the loops get to answer.
const LOOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest token accepted.
const MIN_TOKEN: usize = 16;

/// Refused requests one source may make a minute.
const REFUSALS_PER_MINUTE: u32 = 10;

/// Sources whose refusals are remembered (past it, the oldest minutes go).
const MAX_SOURCES: usize = 4096;

/// Refusals per source in its current minute.
#[derive(Default)]
struct Refusals(
    std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u32)>>,
);

impl Refusals {
    /// Where `peer`'s refusals are counted: its IPv4 address, its IPv6 /64.
    fn source(peer: Option<SocketAddr>) -> std::net::IpAddr {
        match peer.map(|p| p.ip().to_canonical()) {
            Some(std::net::IpAddr::V6(v6)) => {
                let s = v6.segments();
                std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
            }
            Some(ip) => ip,
            None => std::net::Ipv4Addr::UNSPECIFIED.into(),
        }
    }

    /// True when `source` used its allowance this minute.
    fn throttled(&self, source: std::net::IpAddr, now: std::time::Instant) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&source).is_some_and(|(start, n)| {
            now.saturating_duration_since(*start) < Duration::from_secs(60)
                && *n >= REFUSALS_PER_MINUTE
        })
    }

    /// Counts a refusal of `source`.
    fn count(&self, source: std::net::IpAddr, now: std::time::Instant) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let minute = Duration::from_secs(60);
        if map.len() >= MAX_SOURCES && !map.contains_key(&source) {
            map.retain(|_, (start, _)| now.saturating_duration_since(*start) < minute);
            if map.len() >= MAX_SOURCES {
                return;
            }
        }
        let entry = map.entry(source).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= minute {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

struct State {
    control: Arc<Control>,
    token: String,
    relay_id: String,
    caps: serde_json::Value,
    /// Called on a drain (tells the registry this relay is draining).
    on_drain: Box<dyn Fn() + Send + Sync>,
    requests: IntCounterVec,
    refusals: Refusals,
}

fn authorized(state: &State, req: &HttpRequest, route: &str) -> Result<(), Box<HttpResponse>> {
    let source = Refusals::source(req.peer_addr());
    let now = std::time::Instant::now();
    if state.refusals.throttled(source, now) {
        state
            .requests
            .with_label_values(&[route, "throttled"])
            .inc();
        return Err(Box::new(HttpResponse::TooManyRequests().json(
            json!({"error": "too many refused requests from this address; wait a minute"}),
        )));
    }
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in constant time: the token is the API's only key.
    let ok = given.len() == state.token.len()
        && given
            .bytes()
            .zip(state.token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if ok {
        return Ok(());
    }
    state
        .requests
        .with_label_values(&[route, "unauthorized"])
        .inc();
    state.refusals.count(source, now);
    warn!(peer = ?req.peer_addr(), route, "admin API: refused a request without the admin token");
    Err(Box::new(HttpResponse::Unauthorized().json(
        json!({"error": "the admin API needs Authorization: Bearer <admin token>"}),
    )))
}

fn info_json(relay: &str, a: &natrix_relay::core::AllocationInfo) -> serde_json::Value {
    let session = natrix_model::SessionToken::session_of(&a.username);
    json!({
        "relay": relay,
        "relayed": a.relayed.to_string(),
        "relayed_v6": a.relayed_v6.map(|r| r.to_string()),
        "client": a.client.client.to_string(),
        "transport": format!("{:?}", a.client.transport).to_lowercase(),
        "username": &*a.username,
        "session": session.map(|(s, _)| s),
        "tenant": session.and_then(|(_, t)| t),
        "expires_in_s": a.expires_in.as_secs(),
        "peers": a.peers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "channels": a.channels,
        "multiplexed": a.multiplexed,
        "client_to_peer": {"packets": a.usage.packets[0], "bytes": a.usage.bytes[0]},
        "peer_to_client": {"packets": a.usage.packets[1], "bytes": a.usage.bytes[1]},
    })
}

async fn ask(state: &web::Data<State>, query: AdminQuery) -> Vec<AdminAnswer> {
    let control = state.control.clone();
    web::block(move || control.ask_loops(query, LOOP_TIMEOUT))
        .await
        .unwrap_or_default()
}

async fn list(
    state: web::Data<State>,
    req: HttpRequest,
    q: web::Query<std::collections::HashMap<String, String>>,
) -> HttpResponse {
    if let Err(r) = authorized(&state, &req, "list") {
        return *r;
    }
    let mut out = Vec::new();
    for answer in ask(&state, AdminQuery::List).await {
        let AdminAnswer::List(infos) = answer else {
            continue;
        };
        out.extend(infos.iter().map(|a| info_json(&state.relay_id, a)));
    }
    let keep = |a: &serde_json::Value| {
        let eq = |key: &str, field: &str| q.get(key).is_none_or(|want| a[field] == want.as_str());
        let peer = q.get("peer").is_none_or(|p| {
            a["peers"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|x| x == p.as_str()))
        });
        let client = q.get("client").is_none_or(|c| {
            a["client"].as_str().is_some_and(|x| {
                x == c
                    || x.rsplit_once(':')
                        .is_some_and(|(ip, _)| ip.trim_matches(['[', ']']) == c)
            })
        });
        eq("user", "username")
            && eq("session", "session")
            && eq("tenant", "tenant")
            && peer
            && client
    };
    out.retain(keep);
    out.sort_by(|a, b| a["relayed"].as_str().cmp(&b["relayed"].as_str()));
    state.requests.with_label_values(&["list", "ok"]).inc();
    HttpResponse::Ok().json(json!({"count": out.len(), "allocations": out}))
}

async fn kill(
    state: web::Data<State>,
    req: HttpRequest,
    path: web::Path<String>,
    q: web::Query<std::collections::HashMap<String, String>>,
) -> HttpResponse {
    if let Err(r) = authorized(&state, &req, "kill") {
        return *r;
    }
    let bad_request = |error: &str| {
        state
            .requests
            .with_label_values(&["kill", "bad_request"])
            .inc();
        HttpResponse::BadRequest().json(json!({ "error": error }))
    };
    let client = match q.get("client").map(|c| c.parse::<SocketAddr>()) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return bad_request("client: give the client's address, IP:PORT"),
    };
    let Ok(relayed) = path.parse::<SocketAddr>() else {
        return bad_request("give the allocation's relayed address, IP:PORT");
    };
    let killed = ask(&state, AdminQuery::Kill(relayed, client))
        .await
        .iter()
        .any(|a| matches!(a, AdminAnswer::Killed(true)));
    if killed {
        tracing::info!(%relayed, "admin API: allocation killed");
        state.requests.with_label_values(&["kill", "ok"]).inc();
        HttpResponse::Ok().json(json!({"killed": true, "relayed": relayed.to_string()}))
    } else {
        state
            .requests
            .with_label_values(&["kill", "not_found"])
            .inc();
        HttpResponse::NotFound().json(json!({"error": format!(
            "no allocation at {relayed}{} (a shared relayed address names its allocation by client: ?client=IP:PORT)",
            client.map_or(String::new(), |c| format!(" for client {c}"))
        )}))
    }
}

async fn drain(state: web::Data<State>, req: HttpRequest) -> HttpResponse {
    if let Err(r) = authorized(&state, &req, "drain") {
        return *r;
    }
    state.control.drain();
    (state.on_drain)();
    tracing::info!("admin API: draining — new allocations refused, existing ones go on");
    state.requests.with_label_values(&["drain", "ok"]).inc();
    HttpResponse::Accepted().json(json!({"draining": true}))
}

async fn quotas(state: web::Data<State>, req: HttpRequest) -> HttpResponse {
    if let Err(r) = authorized(&state, &req, "quotas") {
        return *r;
    }
    let used = state.control.quota_use(20);
    state.requests.with_label_values(&["quotas", "ok"]).inc();
    HttpResponse::Ok().json(json!({
        "allocations": used.allocations,
        "free_ports": used.free_ports,
        "draining": state.control.is_draining(),
        "caps": state.caps,
        "top": used.top.iter().map(|(kind, who, n)| json!({"kind": kind, "who": who, "allocations": n})).collect::<Vec<_>>(),
    }))
}

/// Starts the admin API of `config`'s relay when it asks for one.
pub(crate) fn serve(
    config: &RelayConfig,
    control: Arc<Control>,
    telemetry: &Telemetry,
    on_drain: Box<dyn Fn() + Send + Sync>,
) -> anyhow::Result<Option<(actix_web::dev::ServerHandle, SocketAddr)>> {
    let Some(listen) = config.admin_listen else {
        return Ok(None);
    };
    let token = config
        .admin_token
        .as_ref()
        .map(|t| t.expose().to_owned())
        .filter(|t| t.len() >= MIN_TOKEN)
        .with_context(|| {
            format!("--admin-listen needs --admin-token of at least {MIN_TOKEN} characters")
        })?;
    let caps = json!({
        "max_allocations": config.capacity(),
        "user_quota": config.user_quota,
        "max_allocations_per_ip": config.max_allocations_per_ip,
        "max_allocations_per_tenant": config.max_allocations_per_tenant,
        "bandwidth_per_allocation": config.bandwidth_per_allocation,
    });
    let state = web::Data::new(State {
        control,
        token,
        relay_id: config.relay_id.clone().unwrap_or_default(),
        caps,
        on_drain,
        requests: telemetry.counter_family(&cat::RELAY_ADMIN_REQUESTS_TOTAL),
        refusals: Refusals::default(),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/admin/allocations", web::get().to(list))
            .route("/admin/allocations/{relayed}", web::delete().to(kill))
            .route("/admin/drain", web::post().to(drain))
            .route("/admin/quotas", web::get().to(quotas))
    })
    .workers(1)
    .max_connections(64)
    .client_request_timeout(Duration::from_secs(5))
    .disable_signals()
    .shutdown_timeout(1)
    .bind(listen)
    .with_context(|| format!("binding the admin API on {listen}"))?;
    let addr = server.addrs().first().copied().unwrap_or(listen);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    tracing::info!(%addr, "admin API up");
    Ok(Some((handle, addr)))
}

/// One HTTP/1.1 request to the admin API; the status and the JSON body.
fn request(
    url: &str,
    token: &str,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    let hostport = url
        .strip_prefix("http://")
        .context("--admin-url is http://HOST:PORT")?
        .trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .with_context(|| format!("resolving {hostport}"))?
        .next()
        .with_context(|| format!("{hostport} resolves to nothing"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to the admin API at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.take(16 << 20).read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the admin API sent no HTTP answer")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("the admin API sent no status")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

/// The body of a chunked HTTP answer.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `natrix admin`.
pub(crate) fn run(_global: &Global, args: &AdminArgs) -> anyhow::Result<()> {
    let token = args.token.expose();
    let (method, path) = match args.action.as_str() {
        "list" => {
            let mut q = Vec::new();
            for (k, v) in [
                ("user", &args.user),
                ("session", &args.session),
                ("tenant", &args.tenant),
                ("peer", &args.peer),
                ("client", &args.client),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", urlencode(v)));
                }
            }
            ("GET", format!("/admin/allocations?{}", q.join("&")))
        }
        "kill" => {
            let relayed = args.relayed.as_deref().context(
                "kill takes the allocation's relayed address: natrix admin kill IP:PORT",
            )?;
            let client = args
                .client
                .as_deref()
                .map_or(String::new(), |c| format!("?client={}", urlencode(c)));
            (
                "DELETE",
                format!("/admin/allocations/{}{client}", urlencode(relayed)),
            )
        }
        "drain" => ("POST", "/admin/drain".to_owned()),
        _ => ("GET", "/admin/quotas".to_owned()),
    };
    let (status, body) = request(&args.url, token, method, &path)?;
    if args.json || args.action != "list" || !(200..300).contains(&status) {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!(
            "{:<24} {:<24} {:<5} {:<40} {:>8} {:>12} {:>12}",
            "relayed", "client", "proto", "username", "left s", "bytes →", "bytes ←"
        );
        for a in body["allocations"].as_array().into_iter().flatten() {
            println!(
                "{:<24} {:<24} {:<5} {:<40} {:>8} {:>12} {:>12}",
                a["relayed"].as_str().unwrap_or(""),
                a["client"].as_str().unwrap_or(""),
                a["transport"].as_str().unwrap_or(""),
                a["username"].as_str().unwrap_or(""),
                a["expires_in_s"],
                a["client_to_peer"]["bytes"],
                a["peer_to_client"]["bytes"]
            );
        }
        println!("{} allocations", body["count"]);
    }
    if !(200..300).contains(&status) {
        anyhow::bail!("the admin API answered {status}");
    }
    Ok(())
}

/// Percent-encodes what a query value or path segment cannot hold.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_and_encodings() {
        assert_eq!(dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"), "{\"a\":1}");
        assert_eq!(urlencode("[2001:db8::1]:3478"), "%5B2001:db8::1%5D:3478");
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }
}
