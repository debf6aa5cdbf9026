//! How a client reaches a server: the client transport of RFC 8656 §3.1.

use serde::{Deserialize, Serialize};

/// How a client reaches the relay or CDX (RFC 8656 §3.1 "client
/// transport"); its JSON and metric name is [`Transport::label`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP: one message per datagram, ChannelData padding optional.
    #[default]
    Udp,
    /// TCP: a byte stream, STUN framed by its length (RFC 8489 §6.2.2),
    /// ChannelData padded to four bytes (RFC 8656 §12.5).
    Tcp,
    /// TLS over TCP (RFC 8656 §3.1): framed as TCP.
    Tls,
    /// DTLS over UDP (RFC 7350): one message per record, as UDP.
    Dtls,
}

impl Transport {
    /// Every transport.
    pub const ALL: [Transport; 4] = [
        Transport::Udp,
        Transport::Tcp,
        Transport::Tls,
        Transport::Dtls,
    ];

    /// True for stream transports, which need framing and ChannelData
    /// padding.
    pub const fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }

    /// The name in JSON, on command lines and as a metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Dtls => "dtls",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        Transport::ALL
            .into_iter()
            .find(|t| t.label().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown transport {s:?}: udp, tcp, tls or dtls"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_read_back_what_they_print() {
        for t in Transport::ALL {
            assert_eq!(t.to_string().parse::<Transport>(), Ok(t));
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.label()));
        }
        assert_eq!("TLS".parse::<Transport>(), Ok(Transport::Tls));
        assert!(
            "quic"
                .parse::<Transport>()
                .unwrap_err()
                .contains("udp, tcp, tls or dtls")
        );
        assert!(Transport::Tls.is_stream() && !Transport::Udp.is_stream());
        assert!(!Transport::Dtls.is_stream());
    }
}
