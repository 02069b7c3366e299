//! A private Postfix instance for tests (own config, queue and data directories under a temp
//! dir; `postfix -c DIR start`), relaying everything to a loopback next hop. The system's
//! instance and /etc/postfix are not touched. Stopped on drop.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::mailtrail::free_port;

pub struct Postfix {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

fn postfix_bin() -> PathBuf {
    ["/usr/sbin/postfix", "/usr/bin/postfix"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("postfix is installed (scripts/install-test-deps)")
}

impl Postfix {
    /// Accepts from loopback on a free port and relays all mail to `127.0.0.1:relay_port`.
    pub fn start_relay_to(relay_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path();
        for d in ["etc", "queue", "data"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        let _ = Command::new("chown")
            .arg("postfix")
            .arg(base.join("data"))
            .status();
        let port = free_port();
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {q}\n\
             data_directory = {d}\n\
             maillog_file_prefixes = {b}\n\
             maillog_file = {b}/maillog\n\
             myhostname = smarthost.test\n\
             mydomain = test\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mydestination =\n\
             local_recipient_maps =\n\
             alias_maps =\n\
             alias_database =\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             smtpd_tls_security_level = none\n\
             smtp_tls_security_level = none\n\
             default_transport = smtp\n\
             relay_transport = smtp\n\
             relayhost = [127.0.0.1]:{relay_port}\n\
             biff = no\n",
            q = base.join("queue").display(),
            d = base.join("data").display(),
            b = base.display(),
        );
        std::fs::write(base.join("etc/main.cf"), main_cf).unwrap();
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd\n\
             pickup     unix  n - n 60 1 pickup\n\
             cleanup    unix  n - n - 0 cleanup\n\
             qmgr       unix  n - n 300 1 qmgr\n\
             tlsmgr     unix  - - n 1000? 1 tlsmgr\n\
             rewrite    unix  - - n - - trivial-rewrite\n\
             bounce     unix  - - n - 0 bounce\n\
             defer      unix  - - n - 0 bounce\n\
             trace      unix  - - n - 0 bounce\n\
             verify     unix  - - n - 1 verify\n\
             flush      unix  n - n 1000? 0 flush\n\
             proxymap   unix  - - n - - proxymap\n\
             proxywrite unix  - - n - 1 proxymap\n\
             smtp       unix  - - n - - smtp\n\
             relay      unix  - - n - - smtp\n\
             showq      unix  n - n - - showq\n\
             error      unix  - - n - - error\n\
             retry      unix  - - n - - error\n\
             discard    unix  - - n - - discard\n\
             anvil      unix  - - n - 1 anvil\n\
             scache     unix  - - n - 1 scache\n\
             postlog    unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(base.join("etc/master.cf"), master_cf).unwrap();
        let etc = base.join("etc");
        let status = Command::new(postfix_bin())
            .arg("-c")
            .arg(&etc)
            .arg("start")
            .status()
            .expect("run postfix");
        assert!(status.success(), "postfix start failed");
        let pf = Self { dir, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postfix did not listen:\n{}",
                pf.maillog()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pf
    }

    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(postfix_bin())
            .arg("-c")
            .arg(self.dir.path().join("etc"))
            .arg("stop")
            .status();
    }
}
