//! Connection-data exchange on this node: the wire codec and the session
//! registry are sans-IO in `natrix_cdx_proto::exchange` (re-exported here,
//! with the protocol's documentation); here are the actor that owns store
//! traffic, answers and deliveries ([`ExchangeActor`]), and the client
//! participants run ([`client`]).

mod actor;
pub mod client;

pub use actor::{ExchangeActor, ExchangeInbox, ExchangeSender, Inbound, StreamReply, inbox};
pub use natrix_cdx_proto::exchange::*;

#[cfg(test)]
mod tests {
    use super::Reject;

    #[test]
    fn every_reject_reason_is_in_the_metric_catalogue() {
        let def = natrix_telemetry::catalogue::CDX_EXCHANGE_POSTS_TOTAL;
        let values = def.labels[0].values;
        for r in Reject::ALL {
            assert!(values.contains(&r.label()), "{}", r.label());
        }
        assert!(values.contains(&"accepted"));
    }
}
