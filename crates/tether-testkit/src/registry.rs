//! An OCI registry on loopback: Debian's `docker-registry` (the distribution registry), started
//! for one test with its storage in a temporary directory, stopped on drop.

use std::{
    io::BufRead as _,
    process::{Child, Command, Stdio},
    time::Duration,
};

#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`: the registry part of an image reference.
    pub host: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts the registry and waits (at most 20 s) for its `listening on` line.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::netns::free_port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n  secret: tether-test\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker-registry is not installed (apt-get install docker-registry; scripts/install-deps does)");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let ready = format!("listening on {host}");
        std::thread::spawn(move || {
            let mut said = Vec::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains(&ready) {
                    let _ = tx.send(Ok(()));
                }
                said.push(line);
            }
            let _ = tx.send(Err(said.join("\n")));
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => {}
            Ok(Err(said)) => panic!("docker-registry stopped before listening:\n{said}"),
            Err(_) => panic!("docker-registry did not listen on {host} within 20 s"),
        }
        Registry {
            child,
            host,
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
