//! Dead-peer detection on every TCP session pgmesh holds with PostgreSQL.
//!
//! Several of those sessions hold something another node waits for: the capture
//! leader's session holds the leader lock, its walsender the replication slot, an
//! apply session its replication origin and, during a batch, row locks. When a
//! network partition cuts a node off, packets vanish without a reset, and with the
//! operating system's defaults the server notices a dead client only after about
//! two hours of TCP keepalive silence; until then no standby can take over. So both
//! ends ask for keepalives and a user timeout of their own:
//!
//! - the client side ([`client_config`], [`Settings`]): keepalive probes after
//!   [`IDLE`], every [`INTERVAL`], [`RETRIES`] unanswered ones drop the connection;
//!   sent data unacknowledged for [`USER_TIMEOUT`] drops it too; and a connection
//!   attempt gives up after [`CONNECT_TIMEOUT`];
//! - the server side ([`SERVER`], run once per session): the same through
//!   PostgreSQL's `tcp_keepalives_*` and `tcp_user_timeout` settings, so the
//!   backend of a vanished node ends, and lets go of what it held, within about
//!   half a minute.
//!
//! Settings the connection URL (or the server's configuration) already makes
//! stricter are kept. None of this limits how long a query may run: a busy server
//! still acknowledges packets and answers probes.

use std::time::Duration;

use tokio::net::TcpStream;

/// Idle time before the first keepalive probe.
pub const IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection counts as dead.
pub const RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the connection counts as dead.
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// tokio-postgres's own keepalive idle time, which means "not set in the URL".
const LIBRARY_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Applies the client side to a connection's configuration, leaving alone what the
/// URL set (`keepalives_idle`, `keepalives_interval`, `keepalives_retries`,
/// `tcp_user_timeout`, `connect_timeout`).
pub fn client_config(c: &mut tokio_postgres::Config) {
    if c.get_keepalives_idle() == LIBRARY_IDLE {
        c.keepalives_idle(IDLE);
    }
    if c.get_keepalives_interval().is_none() {
        c.keepalives_interval(INTERVAL);
    }
    if c.get_keepalives_retries().is_none() {
        c.keepalives_retries(RETRIES);
    }
    if c.get_tcp_user_timeout().is_none() {
        c.tcp_user_timeout(USER_TIMEOUT);
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(CONNECT_TIMEOUT);
    }
}

/// The client side of a connection pgmesh makes itself (the replication
/// connection): the constants above, or what its URL says (libpq's names and units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub idle: Duration,
    pub interval: Duration,
    pub retries: u32,
    pub user_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            idle: IDLE,
            interval: INTERVAL,
            retries: RETRIES,
            user_timeout: USER_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }
}

impl Settings {
    /// Takes URL parameter `key` if it is one of these settings: `keepalives_idle`,
    /// `keepalives_interval` and `connect_timeout` in seconds, `keepalives_retries`
    /// a count, `tcp_user_timeout` in milliseconds. `Ok(false)`: not one of them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        const KEYS: [&str; 5] = [
            "keepalives_idle",
            "keepalives_interval",
            "keepalives_retries",
            "tcp_user_timeout",
            "connect_timeout",
        ];
        if !KEYS.contains(&key) {
            return Ok(false);
        }
        let n: u64 = value
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                format!("URL parameter {key} must be a positive whole number, not {value:?}")
            })?;
        match key {
            "keepalives_idle" => self.idle = Duration::from_secs(n),
            "keepalives_interval" => self.interval = Duration::from_secs(n),
            "keepalives_retries" => self.retries = u32::try_from(n).unwrap_or(u32::MAX),
            "tcp_user_timeout" => self.user_timeout = Duration::from_millis(n),
            _ => self.connect_timeout = Duration::from_secs(n),
        }
        Ok(true)
    }

    /// Applies the keepalives and the user timeout to a connected socket.
    pub fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        let s = socket2::SockRef::from(stream);
        s.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(self.idle)
                .with_interval(self.interval)
                .with_retries(self.retries),
        )?;
        s.set_tcp_user_timeout(Some(self.user_timeout))
    }
}

/// The server side, for the current session: each of PostgreSQL's settings is
/// lowered to pgmesh's value unless it is stricter already (0 means the operating
/// system's default), and left alone on a server that lacks it (`tcp_user_timeout`
/// is PostgreSQL 12's). Over a Unix socket the settings do nothing. It works in a
/// `replication=database` session too.
pub const SERVER: &str = "SELECT count(set_config(name, v::text, false))
     FROM (VALUES ('tcp_keepalives_idle', 10), ('tcp_keepalives_interval', 5),
                  ('tcp_keepalives_count', 3), ('tcp_user_timeout', 30000)) AS d(name, v)
     WHERE current_setting(name, true)::int NOT BETWEEN 1 AND v";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_wins_over_the_defaults() {
        let mut c: tokio_postgres::Config = "postgres://u@h/d?keepalives_idle=3&tcp_user_timeout=7"
            .parse()
            .unwrap();
        client_config(&mut c);
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(3));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
        assert_eq!(c.get_keepalives_interval(), Some(INTERVAL));
        assert_eq!(c.get_keepalives_retries(), Some(RETRIES));
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));

        let mut c: tokio_postgres::Config = "postgres://u@h/d".parse().unwrap();
        client_config(&mut c);
        assert_eq!(c.get_keepalives_idle(), IDLE);
        assert_eq!(c.get_tcp_user_timeout(), Some(&USER_TIMEOUT));
        assert!(c.get_keepalives());
    }

    #[test]
    fn the_server_values_match_the_client_ones() {
        for (name, v) in [
            ("tcp_keepalives_idle", IDLE.as_secs()),
            ("tcp_keepalives_interval", INTERVAL.as_secs()),
            ("tcp_keepalives_count", u64::from(RETRIES)),
            ("tcp_user_timeout", USER_TIMEOUT.as_millis() as u64),
        ] {
            assert!(SERVER.contains(&format!("('{name}', {v})")), "{name}");
        }
    }

    #[test]
    fn settings_from_url_parameters() {
        let mut s = Settings::default();
        assert_eq!(s.set("keepalives_idle", "4"), Ok(true));
        assert_eq!(s.set("tcp_user_timeout", "2500"), Ok(true));
        assert_eq!(s.set("sslmode", "1"), Ok(false));
        assert_eq!(s.set("other", "not a number"), Ok(false));
        assert!(s.set("keepalives_retries", "x").is_err());
        assert!(s.set("keepalives_interval", "0").is_err());
        assert_eq!(s.idle, Duration::from_secs(4));
        assert_eq!(s.user_timeout, Duration::from_millis(2500));
        assert_eq!(s.interval, INTERVAL);
    }

    async fn settings(c: &tokio_postgres::Client) -> Vec<String> {
        let mut out = Vec::new();
        for name in [
            "tcp_keepalives_idle",
            "tcp_keepalives_interval",
            "tcp_keepalives_count",
            "tcp_user_timeout",
        ] {
            let r = c
                .query_one("SELECT current_setting($1)", &[&name])
                .await
                .unwrap();
            out.push(r.get(0));
        }
        out
    }

    /// Over TCP (the test database's URL is a TCP one), every pgmesh session asks the
    /// server for these settings, and a stricter one stays.
    #[tokio::test]
    async fn sessions_ask_the_server_for_keepalives_unless_it_has_stricter_ones() {
        let Ok(url) = std::env::var("PGMESH_TEST_DATABASE_URL") else {
            return;
        };
        let c = crate::catalog::connect_as(&url, "pgmesh-keepalive-test")
            .await
            .unwrap();
        assert_eq!(settings(&c).await, ["10", "5", "3", "30000"]);
        c.batch_execute("SET tcp_keepalives_idle = 4; SET tcp_user_timeout = 90000")
            .await
            .unwrap();
        c.execute(SERVER, &[]).await.unwrap();
        assert_eq!(settings(&c).await, ["4", "5", "3", "30000"]);
    }
}
