//! systemd's notify protocol (`sd_notify(3)`): `READY=1`, `STATUS=...`, `WATCHDOG=1`,
//! `STOPPING=1` as datagrams to `$NOTIFY_SOCKET`. A no-op when not run by systemd.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where to send notifications, from the environment systemd sets for `Type=notify` units.
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

enum Target {
    Path(std::path::PathBuf),
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Read `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        Self::from_vars(
            std::env::var_os("NOTIFY_SOCKET").map(|s| s.to_string_lossy().into_owned()),
            std::env::var("WATCHDOG_USEC").ok(),
            std::env::var("WATCHDOG_PID").ok(),
        )
    }

    fn from_vars(socket: Option<String>, usec: Option<String>, pid: Option<String>) -> Notifier {
        let target = socket.filter(|s| !s.is_empty()).map(|s| match s.strip_prefix('@') {
            #[cfg(target_os = "linux")]
            Some(name) => Target::Abstract(name.as_bytes().to_vec()),
            #[cfg(not(target_os = "linux"))]
            Some(_) => Target::Path(s.clone().into()),
            None => Target::Path(s.into()),
        });
        // The watchdog applies to us only if WATCHDOG_PID is unset or names this process.
        let ours = pid.is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = usec.and_then(|u| u.parse::<u64>().ok()).filter(|u| *u > 0 && ours).map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// Whether systemd is listening.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog timeout systemd expects pings within (ping at half of it).
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Send one notification (newline-separated assignments).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some(target) = &self.target else { return Ok(()) };
        let sock = UnixDatagram::unbound()?;
        match target {
            Target::Path(p) => sock.send_to(state.as_bytes(), p).map(|_| ()),
            #[cfg(target_os = "linux")]
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr).map(|_| ())
            }
        }
    }

    pub fn ready(&self) -> io::Result<()> {
        self.notify("READY=1")
    }
    pub fn status(&self, text: &str) -> io::Result<()> {
        // A newline would start a new assignment.
        self.notify(&format!("STATUS={}", text.replace('\n', " ")))
    }
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }
    pub fn reloading(&self) -> io::Result<()> {
        self.notify("RELOADING=1")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_vars(Some(path.to_string_lossy().into_owned()), None, None);
        assert!(n.enabled());
        n.ready().unwrap();
        n.status("2 streams\nstreaming").unwrap();
        n.watchdog().unwrap();
        n.stopping().unwrap();
        assert_eq!(recv(&server), "READY=1");
        assert_eq!(recv(&server), "STATUS=2 streams streaming");
        assert_eq!(recv(&server), "WATCHDOG=1");
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vigil-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::from_vars(Some(format!("@{name}")), None, None);
        n.ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
    }

    #[test]
    fn without_systemd_it_is_a_no_op() {
        let n = Notifier::from_vars(None, None, None);
        assert!(!n.enabled());
        n.ready().unwrap();
    }

    #[test]
    fn watchdog_only_for_our_pid() {
        let me = std::process::id().to_string();
        let n = Notifier::from_vars(None, Some("20000000".into()), Some(me));
        assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(20)));
        let other = Notifier::from_vars(None, Some("20000000".into()), Some("1".into()));
        assert_eq!(other.watchdog_timeout(), None);
        assert_eq!(Notifier::from_vars(None, Some("0".into()), None).watchdog_timeout(), None);
    }
}
