//! Dead-peer detection on every TCP session pgmesh holds with PostgreSQL.
//!
//! Several of those sessions hold something another node waits for: the capture
//! leader's session holds the leader lock, its walsender the replication slot, an
//! apply session its replication origin and, during a batch, row locks. When a
//! network partition cuts a node off, packets vanish without a reset, and with the
//! operating system's defaults the server notices a dead client only after about
//! two hours of TCP keepalive silence; until then no standby can take over. So:
//!
//! - the server side ([`SERVER`], run once per session) gets keepalive probes after
//!   [`IDLE`], every [`INTERVAL`], [`RETRIES`] unanswered ones ending the session;
//!   sent data unacknowledged for [`SERVER_USER_TIMEOUT`] ends it too; and a backend
//!   busy with a statement checks every [`CHECK_INTERVAL`] that its client is still
//!   there (PostgreSQL 14 and later). The backend of a vanished node ends, and lets
//!   go of what it held, within about half a minute;
//! - the client side ([`client_config`], [`Settings`]) gets the same keepalives and
//!   a connection attempt gives up after [`CONNECT_TIMEOUT`]. No user timeout is set
//!   there unless the URL asks for one (`tcp_user_timeout`, in milliseconds as in
//!   libpq): since Linux 5.11 it also ends a connection whose server has not read for
//!   that long, say while a statement waits on a lock behind a large pipelined batch.
//!
//! Settings the connection URL (or the server's configuration) already makes
//! stricter are kept. The URL changes the client side only.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::pgtls::{take_params, PgTlsError};

/// Idle time before the first keepalive probe.
pub const IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection counts as dead.
pub const RETRIES: u32 = 3;
/// How long data the server sent may stay unacknowledged before it drops the
/// session. pgmesh reads what its sessions are sent as it arrives, so only a dead
/// node leaves it unacknowledged that long (a walsender streaming to one would
/// otherwise wait for `wal_sender_timeout`, a minute by default).
pub const SERVER_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a backend running a statement checks that its client is still there.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// tokio-postgres's own keepalive idle time, which means "not set in the URL".
const LIBRARY_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Largest keepalive idle time and interval Linux accepts, in seconds.
const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// Largest keepalive probe count Linux accepts.
const MAX_RETRIES: u64 = 127;

/// Applies the client side to a connection's configuration, leaving alone what the
/// URL set (`keepalives_idle`, `keepalives_interval`, `keepalives_retries`,
/// `connect_timeout`). `user_timeout` is the URL's `tcp_user_timeout`, taken out of
/// it by [`take_user_timeout`] because tokio-postgres would read it as seconds.
pub fn client_config(c: &mut tokio_postgres::Config, user_timeout: Option<Duration>) {
    if c.get_keepalives_idle() == LIBRARY_IDLE {
        c.keepalives_idle(IDLE);
    }
    if c.get_keepalives_interval().is_none() {
        c.keepalives_interval(INTERVAL);
    }
    if c.get_keepalives_retries().is_none() {
        c.keepalives_retries(RETRIES);
    }
    if let Some(t) = user_timeout {
        c.tcp_user_timeout(t);
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(CONNECT_TIMEOUT);
    }
}

/// `tcp_user_timeout` (milliseconds, as in libpq) taken out of a connection string,
/// URL or `key=value` form: the string without it, and its value.
pub fn take_user_timeout(conn: &str) -> Result<(String, Option<Duration>), PgTlsError> {
    let mut s = Settings::default();
    let rest = take_params(conn, |k, v| match k {
        "tcp_user_timeout" => s.set(k, &v).map_err(PgTlsError::Url),
        _ => Ok(false),
    })?;
    Ok((rest, s.user_timeout))
}

/// Connects to `host:port`, trying each address it resolves to in turn, each for at
/// most `timeout` (as libpq and tokio-postgres do): a first address that drops
/// packets (a broken IPv6 route, say) must not use up the time of the others.
pub async fn connect(host: &str, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out after {timeout:?}"),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}

/// The client side of a connection pgmesh makes itself (the replication
/// connection, and the proxied sessions' sockets): the constants above, or what its
/// URL says (libpq's names and units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub idle: Duration,
    pub interval: Duration,
    pub retries: u32,
    /// None: the operating system's behaviour.
    pub user_timeout: Option<Duration>,
    pub connect_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            idle: IDLE,
            interval: INTERVAL,
            retries: RETRIES,
            user_timeout: None,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }
}

impl Settings {
    /// Takes URL parameter `key` if it is one of these settings: `keepalives_idle`,
    /// `keepalives_interval` and `connect_timeout` in seconds, `keepalives_retries`
    /// a count, `tcp_user_timeout` in milliseconds. `Ok(false)`: not one of them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let max = match key {
            "keepalives_idle" | "keepalives_interval" => MAX_KEEPALIVE_SECS,
            "keepalives_retries" => MAX_RETRIES,
            "tcp_user_timeout" => u64::from(u32::MAX),
            "connect_timeout" => 24 * 60 * 60,
            _ => return Ok(false),
        };
        let n: u64 = value
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                format!("URL parameter {key} must be a whole number from 1 to {max}, not {value:?}")
            })?;
        match key {
            "keepalives_idle" => self.idle = Duration::from_secs(n),
            "keepalives_interval" => self.interval = Duration::from_secs(n),
            "keepalives_retries" => self.retries = n as u32,
            "tcp_user_timeout" => self.user_timeout = Some(Duration::from_millis(n)),
            _ => self.connect_timeout = Duration::from_secs(n),
        }
        Ok(true)
    }

    /// Applies the keepalives and any user timeout to a connected socket; both are
    /// tried, and the first failure is returned.
    pub fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        let s = socket2::SockRef::from(stream);
        let keepalive = s.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(self.idle)
                .with_interval(self.interval)
                .with_retries(self.retries),
        );
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let user = match self.user_timeout {
            Some(t) => s.set_tcp_user_timeout(Some(t)),
            None => Ok(()),
        };
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let user: std::io::Result<()> = Ok(());
        keepalive.and(user)
    }
}

/// The server side, for the current session: each of PostgreSQL's settings is
/// lowered to pgmesh's value unless it is stricter already (0 means the operating
/// system's default, or no check), and left alone on a server that lacks it
/// (`tcp_user_timeout` is PostgreSQL 12's, `client_connection_check_interval` 14's).
/// Values are compared as `pg_settings` shows them, in the setting's base unit
/// (`current_setting` would add units to some). Over a Unix socket the TCP settings
/// do nothing. It works in a `replication=database` session too.
pub const SERVER: &str = "SELECT count(set_config(name, v::text, false))
     FROM (VALUES ('tcp_keepalives_idle', 10), ('tcp_keepalives_interval', 5),
                  ('tcp_keepalives_count', 3), ('tcp_user_timeout', 30000),
                  ('client_connection_check_interval', 10000)) AS d(name, v)
     WHERE (SELECT setting::int FROM pg_settings s WHERE s.name = d.name) NOT BETWEEN 1 AND v";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_wins_over_the_defaults() {
        let (url, user) =
            take_user_timeout("postgres://u@h/d?keepalives_idle=3&tcp_user_timeout=7000&x=1")
                .unwrap();
        assert_eq!(url, "postgres://u@h/d?keepalives_idle=3&x=1");
        assert_eq!(user, Some(Duration::from_millis(7000)));
        let mut c: tokio_postgres::Config = "postgres://u@h/d?keepalives_idle=3".parse().unwrap();
        client_config(&mut c, user);
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(3));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_millis(7000)));
        assert_eq!(c.get_keepalives_interval(), Some(INTERVAL));
        assert_eq!(c.get_keepalives_retries(), Some(RETRIES));
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));

        let mut c: tokio_postgres::Config = "postgres://u@h/d".parse().unwrap();
        client_config(&mut c, None);
        assert_eq!(c.get_keepalives_idle(), IDLE);
        assert_eq!(c.get_tcp_user_timeout(), None);
        assert!(c.get_keepalives());

        let (dsn, user) = take_user_timeout("host=h tcp_user_timeout=250 user=u").unwrap();
        assert_eq!(
            (dsn.as_str(), user),
            ("host=h user=u", Some(Duration::from_millis(250)))
        );
        assert_eq!(
            take_user_timeout("postgres://h/d").unwrap(),
            ("postgres://h/d".into(), None)
        );
        assert!(take_user_timeout("postgres://h/d?tcp_user_timeout=soon").is_err());
    }

    #[test]
    fn the_server_values_match_the_constants() {
        for (name, v) in [
            ("tcp_keepalives_idle", IDLE.as_secs()),
            ("tcp_keepalives_interval", INTERVAL.as_secs()),
            ("tcp_keepalives_count", u64::from(RETRIES)),
            ("tcp_user_timeout", SERVER_USER_TIMEOUT.as_millis() as u64),
            (
                "client_connection_check_interval",
                CHECK_INTERVAL.as_millis() as u64,
            ),
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
        for (k, v) in [
            ("keepalives_retries", "x"),
            ("keepalives_interval", "0"),
            ("keepalives_retries", "200"),
            ("keepalives_idle", "40000"),
        ] {
            let e = s.set(k, v).unwrap_err();
            assert!(e.contains(k), "{e}");
        }
        assert_eq!(s.idle, Duration::from_secs(4));
        assert_eq!(s.user_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(s.interval, INTERVAL);
        assert_eq!(Settings::default().user_timeout, None);
    }

    #[tokio::test]
    async fn connecting_reports_the_last_address_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        connect("localhost", port, Duration::from_secs(2))
            .await
            .unwrap();
        drop(listener);
        let e = connect("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }

    async fn settings(c: &tokio_postgres::Client) -> Vec<String> {
        let r = c
            .query_one(
                "SELECT array_agg(setting ORDER BY name) FROM pg_settings
                 WHERE name IN ('client_connection_check_interval', 'tcp_keepalives_count',
                                'tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_user_timeout')",
                &[],
            )
            .await
            .unwrap();
        r.get(0)
    }

    /// Over TCP (the test database's URL is a TCP one), every pgmesh session asks the
    /// server for these settings, a stricter one stays, and running it again changes
    /// nothing (values with units compare right).
    #[tokio::test]
    async fn sessions_ask_the_server_for_keepalives_unless_it_has_stricter_ones() {
        let Ok(url) = std::env::var("PGMESH_TEST_DATABASE_URL") else {
            return;
        };
        let c = crate::catalog::connect_as(&url, "pgmesh-keepalive-test")
            .await
            .unwrap();
        // By name: check interval, count, idle, interval, user timeout.
        assert_eq!(settings(&c).await, ["10000", "3", "10", "5", "30000"]);
        c.batch_execute("SET tcp_keepalives_idle = 4; SET tcp_user_timeout = 90000")
            .await
            .unwrap();
        c.execute(SERVER, &[]).await.unwrap();
        c.execute(SERVER, &[]).await.unwrap();
        assert_eq!(settings(&c).await, ["10000", "3", "4", "5", "30000"]);
    }
}
