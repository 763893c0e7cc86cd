use super::*;
use crate::channel::FsMode;

fn spec() -> PolicySpec {
    PolicySpec {
        fs_mode: FsMode::Read,
        outgoing_tcp: true,
        outgoing_udp: true,
        outgoing_ignore_localhost: true,
        dns_enabled: true,
        ..PolicySpec::default()
    }
}

fn places() -> LocalPlaces {
    LocalPlaces {
        home: Some("/home/dev".into()),
        cwd: Some("/work/app".into()),
        exe: Some("/usr/local/bin/python3".into()),
        tmpdir: None,
    }
}

fn file(policy: &Policy, path: &str, write: bool) -> FsRoute {
    policy.file(Path::new(path), write)
}

#[test]
fn read_mode_reads_the_target_and_writes_locally() {
    let policy = Policy::new(&spec(), &places());
    assert_eq!(file(&policy, "/srv/config.yaml", false), FsRoute::Remote);
    assert_eq!(file(&policy, "/srv/config.yaml", true), FsRoute::Local);
    assert_eq!(file(&policy, "/etc/resolv.conf", false), FsRoute::Remote);
    assert_eq!(file(&policy, "/etc/hosts", false), FsRoute::Remote);
    assert_eq!(
        file(
            &policy,
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            false
        ),
        FsRoute::Remote
    );
}

#[test]
fn the_machine_s_own_files_stay_local() {
    let policy = Policy::new(&spec(), &places());
    for path in [
        "/proc/self/maps",
        "/sys/kernel",
        "/dev/urandom",
        "/usr/lib/python3.11/os.py",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/tmp/x",
        "/var/tmp/x",
        "/home/dev/.npmrc",
        "/work/app/src/main.py",
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/localtime",
        "/etc/passwd",
        "/etc/nsswitch.conf",
        "/etc/python3.11/sitecustomize.py",
        "/etc/ld.so.cache",
        "relative/path",
        "/",
    ] {
        assert_eq!(file(&policy, path, false), FsRoute::Local, "{path}");
    }
}

#[test]
fn dot_dot_cannot_dodge_the_local_defaults_or_the_lists() {
    let policy = Policy::new(&spec(), &places());
    assert_eq!(file(&policy, "/usr/../srv/x", false), FsRoute::Remote);
    assert_eq!(
        file(&policy, "/srv/../proc/self/maps", false),
        FsRoute::Local
    );
}

#[test]
fn user_lists_win_in_their_order() {
    let policy = Policy::new(
        &PolicySpec {
            fs_not_found: vec!["^/srv/hidden".into()],
            fs_local: vec!["^/srv/local".into()],
            fs_read_write: vec!["^/srv/shared".into(), "^/tmp/remote".into()],
            fs_read_only: vec!["^/usr/share/app".into()],
            ..spec()
        },
        &places(),
    );
    assert_eq!(file(&policy, "/srv/hidden/x", false), FsRoute::NotFound);
    assert_eq!(file(&policy, "/srv/local/x", false), FsRoute::Local);
    assert_eq!(file(&policy, "/srv/shared/x", true), FsRoute::Remote);
    assert_eq!(
        file(&policy, "/tmp/remote/x", false),
        FsRoute::Remote,
        "lists beat the defaults"
    );
    assert_eq!(file(&policy, "/usr/share/app/x", false), FsRoute::Remote);
    assert_eq!(file(&policy, "/usr/share/app/x", true), FsRoute::Local);
}

#[test]
fn write_and_local_modes() {
    let write = Policy::new(
        &PolicySpec {
            fs_mode: FsMode::Write,
            ..spec()
        },
        &places(),
    );
    assert_eq!(file(&write, "/srv/x", true), FsRoute::Remote);
    assert_eq!(file(&write, "/tmp/x", true), FsRoute::Local);
    for mode in [FsMode::Local, FsMode::LocalWithOverrides] {
        let local = Policy::new(
            &PolicySpec {
                fs_mode: mode,
                fs_read_only: vec!["^/srv/only".into()],
                ..spec()
            },
            &places(),
        );
        assert_eq!(file(&local, "/srv/x", false), FsRoute::Local, "{mode:?}");
        assert_eq!(
            file(&local, "/srv/only/x", false),
            FsRoute::Remote,
            "{mode:?}"
        );
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn outgoing_defaults_send_everything_but_loopback_through_the_target() {
    let policy = Policy::new(&spec(), &places());
    assert!(policy.outgoing(Transport::Tcp, addr("10.0.0.5:5432"), None, false));
    assert!(!policy.outgoing(Transport::Tcp, addr("127.0.0.1:5432"), None, false));
    assert!(!policy.outgoing(Transport::Tcp, addr("[::ffff:127.0.0.1]:80"), None, false));
    assert!(!policy.outgoing(Transport::Tcp, addr("0.0.0.0:80"), None, false));
    let off = Policy::new(
        &PolicySpec {
            outgoing_udp: false,
            outgoing_ignore_localhost: false,
            ..spec()
        },
        &places(),
    );
    assert!(!off.outgoing(Transport::Udp, addr("10.0.0.5:53"), None, false));
    assert!(off.outgoing(Transport::Tcp, addr("127.0.0.1:80"), None, false));
}

#[test]
fn outgoing_local_list_by_ip_cidr_port_protocol_and_name() {
    let policy = Policy::new(
        &PolicySpec {
            outgoing_local: Some(vec![
                "10.1.0.0/16".into(),
                "tcp://10.2.0.1:443".into(),
                "udp://10.3.0.1".into(),
                "db.internal:5432".into(),
                "[fd00::1]:80".into(),
            ]),
            ..spec()
        },
        &places(),
    );
    assert!(!policy.outgoing(Transport::Tcp, addr("10.1.2.3:80"), None, false));
    assert!(!policy.outgoing(Transport::Tcp, addr("10.2.0.1:443"), None, false));
    assert!(policy.outgoing(Transport::Tcp, addr("10.2.0.1:80"), None, false));
    assert!(!policy.outgoing(Transport::Udp, addr("10.3.0.1:53"), None, false));
    assert!(policy.outgoing(Transport::Tcp, addr("10.3.0.1:53"), None, false));
    assert!(!policy.outgoing(
        Transport::Tcp,
        addr("10.9.9.9:5432"),
        Some("DB.internal"),
        true
    ));
    assert!(!policy.outgoing(Transport::Tcp, addr("[fd00::1]:80"), None, false));
    // Resolved in the target: through the target even though the address matches by IP.
    assert!(policy.outgoing(Transport::Tcp, addr("10.1.2.3:80"), Some("api.pod"), true));
}

#[test]
fn outgoing_remote_list_keeps_the_rest_local() {
    let policy = Policy::new(
        &PolicySpec {
            outgoing_remote: Some(vec!["10.213.0.0/16".into()]),
            ..spec()
        },
        &places(),
    );
    assert!(policy.outgoing(Transport::Tcp, addr("10.213.0.11:80"), None, false));
    assert!(!policy.outgoing(Transport::Tcp, addr("192.0.2.1:80"), None, false));
    assert!(policy.outgoing(Transport::Tcp, addr("192.0.2.1:80"), Some("x"), true));
}

#[test]
fn dns_filter_and_names_that_never_go_remote() {
    let all = Policy::new(&spec(), &places());
    assert!(all.dns("db.internal"));
    assert!(!all.dns("localhost"));
    assert!(!all.dns("app.localhost"));
    assert!(!all.dns("10.0.0.1"));
    let local = Policy::new(
        &PolicySpec {
            dns_local: Some(vec!["example.com".into()]),
            ..spec()
        },
        &places(),
    );
    assert!(!local.dns("Example.com."));
    assert!(local.dns("db.internal"));
    let remote = Policy::new(
        &PolicySpec {
            dns_remote: Some(vec!["db.internal".into()]),
            ..spec()
        },
        &places(),
    );
    assert!(remote.dns("db.internal"));
    assert!(!remote.dns("example.com"));
    let off = Policy::new(
        &PolicySpec {
            dns_enabled: false,
            ..spec()
        },
        &places(),
    );
    assert!(!off.dns("db.internal"));
}

#[test]
fn bad_entries_are_skipped_not_fatal() {
    assert_eq!(Entry::parse("ftp://x"), None);
    assert_eq!(Entry::parse("host:notaport"), None);
    assert!(Entry::parse("::1").is_some());
}
