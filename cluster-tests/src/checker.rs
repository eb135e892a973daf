//! The exactly-once checker for multi-host tests: while a test runs, it
//! samples every agent's own list (10 Hz) and each watched VPS's counter
//! (served over HTTP at `http://IP/counter`, fetched from a client on the
//! LAN), and records a violation when a VPS runs settled (running, no
//! migration in flight) on two nodes in one sample, or a counter goes back.
//!
//! Self-contained (the agent's tests include this file too).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::agent::v1 as pb;

pub struct Checker {
    stop: Arc<AtomicBool>,
    found: Arc<Mutex<Vec<String>>>,
    samples: Arc<Mutex<u64>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Checker {
    /// `agents`: node name → its agent's address; `client_netns`: the
    /// namespace (a /run/netns path) to fetch counters from, None for this
    /// process's own; `counters`: VPS name → its IP.
    pub fn start(
        agents: Vec<(String, ferry_proto::addr::Addr)>,
        client_netns: Option<String>,
        counters: Vec<(String, String)>,
    ) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let found = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0u64));
        let mut tasks = Vec::new();
        {
            let (stop, found, samples) = (stop.clone(), found.clone(), samples.clone());
            tasks.push(tokio::spawn(async move {
                let mut clients = Vec::new();
                for (node, addr) in &agents {
                    if let Ok(ch) = ferry_proto::addr::connect_node(addr).await {
                        clients.push((node.clone(), ferry_proto::limits::agent_client(ch)));
                    }
                }
                while !stop.load(Ordering::SeqCst) {
                    let mut runs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                    for (node, c) in clients.iter_mut() {
                        // An agent that does not answer (killed, stopped)
                        // runs nothing we can see; its VPSes are judged by
                        // the others' lists.
                        let Ok(r) = tokio::time::timeout(
                            Duration::from_millis(500),
                            c.list_vps(pb::ListVpsRequest {}),
                        )
                        .await
                        else {
                            continue;
                        };
                        let Ok(r) = r else { continue };
                        for v in r.into_inner().vps {
                            if v.status == pb::VpsStatus::Running as i32 && v.migrating.is_empty() {
                                let name = v.spec.map(|s| s.name).unwrap_or_default();
                                runs.entry(name).or_default().insert(node.clone());
                            }
                        }
                    }
                    for (vps, nodes) in runs {
                        if nodes.len() > 1 {
                            found
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("{vps} runs on {nodes:?} at once"));
                        }
                    }
                    *samples.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        {
            let (stop, found) = (stop.clone(), found.clone());
            tasks.push(tokio::spawn(async move {
                let mut last: BTreeMap<String, u64> = BTreeMap::new();
                while !stop.load(Ordering::SeqCst) {
                    for (vps, ip) in &counters {
                        let mut cmd = match &client_netns {
                            Some(ns) => {
                                let mut c = tokio::process::Command::new("nsenter");
                                c.arg(format!("--net={ns}")).args(["--", "curl"]);
                                c
                            }
                            None => tokio::process::Command::new("curl"),
                        };
                        let out = cmd
                            .args(["-s", "-m", "1"])
                            .arg(format!("http://{ip}/counter"))
                            .output()
                            .await;
                        let page = out
                            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                            .unwrap_or_default();
                        let Ok(n) = page.trim().parse::<u64>() else {
                            continue; // not answering right now (the freeze)
                        };
                        if let Some(prev) = last.get(vps) {
                            if n < *prev {
                                found
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(format!("{vps}: counter went back from {prev} to {n}"));
                            }
                        }
                        last.insert(vps.clone(), n);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        Checker {
            stop,
            found,
            samples,
            tasks,
        }
    }

    /// Stops sampling; panics with every violation seen (or when it never
    /// sampled at all).
    pub async fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let found = self.found.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(found.is_empty(), "exactly-once violated: {found:#?}");
        let n = *self.samples.lock().unwrap_or_else(|p| p.into_inner());
        assert!(n > 0, "the checker never sampled");
        n
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}
