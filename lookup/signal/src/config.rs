//! Signalling settings (flags of `natrix lookup` and `natrix up`).

use std::time::Duration;

use clap::Args;

/// Registration, invitation and push limits. Every flag also reads an
/// environment variable.
#[derive(Args, Clone, Debug)]
pub struct SignalConfig {
    /// Let devices register any handle without a grant. For development
    /// only: anyone could then register anyone's handle.
    #[arg(long = "open-registration", env = "NATRIX_OPEN_REGISTRATION")]
    pub open_registration: bool,

    /// How long a registration lives without a refresh.
    #[arg(
        long = "registration-ttl",
        env = "NATRIX_REGISTRATION_TTL",
        default_value = "30d",
        value_parser = humantime::parse_duration
    )]
    pub registration_ttl: Duration,

    /// Lifetime of device tokens (refreshed with the device key).
    #[arg(
        long = "device-token-ttl",
        env = "NATRIX_DEVICE_TOKEN_TTL",
        default_value = "24h",
        value_parser = humantime::parse_duration
    )]
    pub device_token_ttl: Duration,

    /// Devices one handle may have registered at once.
    #[arg(
        long = "max-devices-per-handle",
        env = "NATRIX_MAX_DEVICES_PER_HANDLE",
        default_value_t = 16
    )]
    pub max_devices_per_handle: usize,

    /// Default lifetime of an invitation (a caller may ask for up to
    /// 120 s); late accepts get 410.
    #[arg(
        long = "invite-lifetime",
        env = "NATRIX_INVITE_LIFETIME",
        default_value = "60s",
        value_parser = humantime::parse_duration
    )]
    pub invite_lifetime: Duration,

    /// Invitations one device may send per minute (429 past it).
    #[arg(
        long = "invites-per-minute",
        env = "NATRIX_INVITES_PER_MINUTE",
        default_value_t = 30
    )]
    pub invites_per_minute: u64,

    /// How long a pair's ticket (updates, retries) stays valid.
    #[arg(
        long = "ticket-ttl",
        env = "NATRIX_TICKET_TTL",
        default_value = "1h",
        value_parser = humantime::parse_duration
    )]
    pub ticket_ttl: Duration,

    /// Push sockets one replica holds at most (503 with Retry-After past
    /// it, so the device reconnects to another replica); each costs a few
    /// KB and a file descriptor.
    #[arg(
        long = "max-push-sockets",
        env = "NATRIX_MAX_PUSH_SOCKETS",
        default_value_t = 50_000
    )]
    pub max_push_sockets: usize,

    /// The VAPID key Web Push messages are signed with (PKCS#8 P-256,
    /// base64url). Without it the cluster generates one and keeps it in the
    /// coordination store, so every replica signs with the same key.
    #[arg(long = "vapid-key", env = "NATRIX_VAPID_KEY")]
    pub vapid_key: Option<natrix_model::Redacted>,

    /// The contact push services see in VAPID (`mailto:` or `https:`).
    #[arg(
        long = "vapid-subject",
        env = "NATRIX_VAPID_SUBJECT",
        default_value = "mailto:admin@localhost"
    )]
    pub vapid_subject: String,

    /// The operator's bridge to APNs/FCM: devices registered with a
    /// `webhook` push route are woken by a signed POST here.
    #[arg(long = "push-webhook-url", env = "NATRIX_PUSH_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// The secret webhook POSTs are signed with (X-Natrix-Signature).
    #[arg(long = "push-webhook-secret", env = "NATRIX_PUSH_WEBHOOK_SECRET")]
    pub webhook_secret: Option<natrix_model::Redacted>,
}

impl Default for SignalConfig {
    fn default() -> SignalConfig {
        SignalConfig {
            open_registration: false,
            registration_ttl: Duration::from_secs(30 * 24 * 3600),
            device_token_ttl: Duration::from_secs(24 * 3600),
            max_devices_per_handle: 16,
            invite_lifetime: Duration::from_secs(60),
            invites_per_minute: 30,
            ticket_ttl: Duration::from_secs(3600),
            max_push_sockets: 50_000,
            vapid_key: None,
            vapid_subject: "mailto:admin@localhost".into(),
            webhook_url: None,
            webhook_secret: None,
        }
    }
}

/// Longest invitation lifetime a caller may ask for.
pub const MAX_INVITE_LIFETIME: Duration = Duration::from_secs(120);
