//! What happened to plans: clients report, with the signed report ticket
//! their plan carried, whether the pair went direct, through the relay or
//! not at all, and how long the first packet took. lookup counts them by
//! NAT pair, planned mode and actual path, so operators see when their
//! users' NATs surprise the planner (`lookup_plan_outcomes_total`).
//!
//! The ticket (`<session>.<mode>.<class a>.<class b>.<expires>.<tag>`,
//! HMAC-SHA256 under a key derived from the cluster secret) names what
//! lookup planned; a report cannot claim another plan or NAT pair.

use base64::Engine as _;
use natrix_model::NatClass;
use ring::hmac;

/// How long after its plan expired a report is still taken.
pub const REPORT_GRACE_SECS: u64 = 3600;

/// Actual paths a report may name.
pub const ACTUAL: [&str; 3] = ["direct", "relay", "failed"];

/// Planned modes.
pub const PLANNED: [&str; 3] = ["direct", "relay-one", "relay-both"];

/// What a report ticket says lookup planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The planned path: `direct`, or `relay` (relay-one and relay-both).
    pub mode: &'static str,
    /// The pair's classes, sorted (the `pair` label is `a+b`).
    pub pair: String,
}

fn key(cluster_secret: &[u8]) -> hmac::Key {
    let derived = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, cluster_secret),
        b"natrix outcome report v1",
    );
    hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The pair label of two classes: their names, sorted, joined by `+`.
pub fn pair_label(a: NatClass, b: NatClass) -> String {
    let (x, y) = if a.name() <= b.name() {
        (a.name(), b.name())
    } else {
        (b.name(), a.name())
    };
    format!("{x}+{y}")
}

/// Every pair label (for the metric's catalogue and tests).
pub fn pair_labels() -> Vec<String> {
    let mut all = Vec::new();
    for (i, a) in NatClass::ALL.iter().enumerate() {
        for b in &NatClass::ALL[i..] {
            all.push(pair_label(*a, *b));
        }
    }
    all.sort();
    all
}

/// The report ticket of a plan.
pub fn mint(
    cluster_secret: &[u8],
    session: &str,
    mode: &str,
    a: NatClass,
    b: NatClass,
    expires: u64,
) -> String {
    let body = format!("{session}.{mode}.{}.{}.{expires}", a.name(), b.name());
    let tag = hmac::sign(&key(cluster_secret), body.as_bytes());
    format!("{body}.{}", B64.encode(tag.as_ref()))
}

/// Checks a report ticket at `now` (Unix seconds): what was planned, or why
/// the ticket is refused.
pub fn verify(cluster_secret: &[u8], ticket: &str, now: u64) -> Result<Planned, &'static str> {
    let (body, tag) = ticket.rsplit_once('.').ok_or("not a report ticket")?;
    let tag = B64.decode(tag).map_err(|_| "not a report ticket")?;
    hmac::verify(&key(cluster_secret), body.as_bytes(), &tag)
        .map_err(|_| "the report ticket was not issued by this cluster")?;
    let parts: Vec<&str> = body.split('.').collect();
    let [_session, mode, a, b, expires] = parts[..] else {
        return Err("not a report ticket");
    };
    let class = |name: &str| NatClass::ALL.into_iter().find(|c| c.name() == name);
    let (Some(a), Some(b)) = (class(a), class(b)) else {
        return Err("not a report ticket");
    };
    let mode = match PLANNED.into_iter().find(|m| *m == mode) {
        Some("direct") => "direct",
        Some(_) => "relay",
        None => return Err("not a report ticket"),
    };
    let expires: u64 = expires.parse().map_err(|_| "not a report ticket")?;
    if now > expires.saturating_add(REPORT_GRACE_SECS) {
        return Err("the plan is too old to report on");
    }
    Ok(Planned {
        mode,
        pair: pair_label(a, b),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_names_its_plan_and_nothing_else() {
        let secret = b"a-cluster-secret-0123456789";
        let t = mint(
            secret,
            "ab12",
            "relay-one",
            NatClass::Symmetric,
            NatClass::FullCone,
            1000,
        );
        let p = verify(secret, &t, 1000).unwrap();
        assert_eq!(p.mode, "relay");
        assert_eq!(p.pair, "full-cone+symmetric");
        assert!(verify(b"another-secret-0123456789", &t, 1000).is_err());
        let forged = t.replacen("relay-one", "direct", 1);
        assert!(verify(secret, &forged, 1000).is_err());
        assert_eq!(
            verify(secret, &t, 1000 + REPORT_GRACE_SECS + 1),
            Err("the plan is too old to report on")
        );
        assert_eq!(pair_labels().len(), 21);
        // The metric's catalogue lists exactly these pairs and paths.
        let def = &natrix_telemetry::catalogue::LOOKUP_PLAN_OUTCOMES_TOTAL;
        let mut listed: Vec<String> = def.labels[0].values.iter().map(|v| v.to_string()).collect();
        listed.sort();
        assert_eq!(listed, pair_labels());
        assert_eq!(def.labels[2].values, ACTUAL);
    }
}
