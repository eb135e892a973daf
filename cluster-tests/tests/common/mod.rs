//! Helpers the harness's tests share: VPS specs, counters, waits.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use ferry_cluster_tests::cluster::Ctl;
use ferry_cluster_tests::Cluster;
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

/// A busybox VPS with `mem_mib` of memory and, if given, an address.
pub fn spec(name: &str, ip: Option<&str>, mem_mib: u64) -> apb::VpsSpec {
    apb::VpsSpec {
        name: name.into(),
        template: "busybox".into(),
        limits: Some(apb::Limits {
            memory_bytes: mem_mib << 20,
            ..Default::default()
        }),
        net: ip.map(|ip| apb::NetConfig {
            ip: ip.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Starts a counter in VPS `name` on host `i`: its value in
/// /var/www/counter, which httpd serves (written aside and renamed in).
pub fn start_counter(cl: &Cluster, i: usize, name: &str) {
    let (code, _, err) = cl.ferryctl_agent(
        i,
        &[
            "vps", "exec", name, "--", "setsid", "sh", "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /var/www/.counter; mv /var/www/.counter /var/www/counter; sleep 0.05; done </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(code, 0, "{err}");
}

/// The counter VPS `ip` serves, fetched from this process (a client on the
/// LAN), or None when it does not answer.
pub async fn counter(ip: &str) -> Option<u64> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-m", "2", &format!("http://{ip}/counter")])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Asserts VPS `ip`'s counter goes on.
pub async fn counts_on(name: &str, ip: &str) {
    let n0 = counter(ip).await.unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n1 = counter(ip).await.unwrap_or(0);
    assert!(n1 > n0, "{name}'s counter went {n0} -> {n1}");
}

pub async fn record(c: &mut Ctl, name: &str) -> cpb::ClusterVps {
    c.get_vps(cpb::GetVpsRequest { name: name.into() })
        .await
        .expect("get vps")
        .into_inner()
}

/// The record once `f` holds (what a node reports comes with its heartbeat).
pub async fn record_when(
    c: &mut Ctl,
    name: &str,
    f: impl Fn(&cpb::ClusterVps) -> bool,
) -> cpb::ClusterVps {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let v = record(c, name).await;
        if f(&v) {
            return v;
        }
        assert!(Instant::now() < end, "{name}: {v:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates running VPSes where the scheduler must put them on host `i`
/// (the other agents' nodes cordoned meanwhile), so they are not pinned: a
/// drain may move them. Waits until each runs there.
pub async fn create_unpinned_on(
    cl: &Cluster,
    c: &mut Ctl,
    i: usize,
    vpses: &[(String, String)],
    mem_mib: u64,
) {
    let others: Vec<String> = cl
        .hosts
        .iter()
        .filter(|h| h.agent.is_some() && h.i != i)
        .map(|h| Cluster::node(h.i))
        .collect();
    for n in &others {
        let (code, _, err) = cl.ferryctl(&["node", "cordon", n]);
        assert_eq!(code, 0, "{err}");
    }
    for (name, ip) in vpses {
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(spec(name, Some(ip), mem_mib)),
            ..Default::default()
        })
        .await
        .expect("create");
    }
    for n in &others {
        let (code, _, err) = cl.ferryctl(&["node", "uncordon", n]);
        assert_eq!(code, 0, "{err}");
    }
    for (name, _) in vpses {
        let v = record_when(c, name, |v| v.observed == "running").await;
        assert_eq!(v.node, Cluster::node(i));
    }
}

/// `n` running VPSes on host `i` (not pinned), named `<tag>v<k>` with
/// addresses `10.85.<subnet>.1k`, each serving a counter that runs.
pub async fn counting_vpses_on(
    cl: &Cluster,
    c: &mut Ctl,
    i: usize,
    tag: &str,
    subnet: u8,
    n: usize,
) -> Vec<(String, String)> {
    let vpses: Vec<(String, String)> = (0..n)
        .map(|k| (format!("{tag}v{k}"), format!("10.85.{subnet}.{}", 10 + k)))
        .collect();
    create_unpinned_on(cl, c, i, &vpses, 128).await;
    for (name, _) in &vpses {
        start_counter(cl, i, name);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (name, ip) in &vpses {
        assert!(counter(ip).await.is_some_and(|n| n > 0), "{name} counts");
    }
    vpses
}

/// `node`'s drain or restore, asked of whichever replica leads.
pub async fn drain_of(cl: &Cluster, node: &str) -> Option<cpb::Drain> {
    let (_, mut c) = cl.leader().await;
    c.get_drain(cpb::GetDrainRequest { node: node.into() })
        .await
        .ok()
        .map(|d| d.into_inner())
}

/// Waits until `node`'s drain (or restore) has ended.
pub async fn wait_drain_end(cl: &Cluster, node: &str, secs: u64) -> cpb::Drain {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(d) = drain_of(cl, node).await {
            if !matches!(d.state.as_str(), "running" | "paused") {
                return d;
            }
            assert!(
                Instant::now() < end,
                "the drain never ended: {d:#?}{}",
                cl.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every event the cluster kept.
pub async fn events(c: &mut Ctl) -> Vec<cpb::Event> {
    use futures::StreamExt;
    c.watch_events(cpb::WatchEventsRequest {
        after_seq: 0,
        follow: false,
    })
    .await
    .expect("events")
    .into_inner()
    .filter_map(|e| async { e.ok() })
    .collect()
    .await
}

/// The agents of hosts 1..=n as the checker samples them.
pub fn agents(n: usize) -> Vec<(String, ferry_proto::addr::Addr)> {
    (1..=n)
        .map(|i| {
            (
                Cluster::node(i),
                ferry_proto::addr::Addr::Tcp(Cluster::agent_addr(i)),
            )
        })
        .collect()
}

/// `ferryctl ARGS` against the cluster on a thread of its own (a
/// `--follow` beside the test): exit code, stdout and stderr together.
pub fn ferryctl_thread(cl: &Cluster, args: &[&str]) -> std::thread::JoinHandle<(i32, String)> {
    let all = cl.controllers();
    let mut full = vec!["--controller", all.as_str()];
    full.extend_from_slice(args);
    let cmd = cl.ferryctl_cmd(&full);
    std::thread::spawn(move || {
        let (code, out, err) = ferry_cluster_tests::cluster::run(cmd);
        (code, format!("{out}{err}"))
    })
}

/// Bounds a test: a hang fails it instead of holding CI.
pub async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out");
}

/// Every VPS record once `f` holds for the list.
pub async fn vpses_when(
    c: &mut Ctl,
    what: &str,
    f: impl Fn(&[cpb::ClusterVps]) -> bool,
) -> Vec<cpb::ClusterVps> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let vs = c
            .list_vps(cpb::ListVpsRequest::default())
            .await
            .expect("list vps")
            .into_inner()
            .vps;
        if f(&vs) {
            return vs;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {vs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until node `name` has `status` ("ready", "down", ...).
pub async fn node_when(c: &mut Ctl, name: &str, status: &str, secs: u64) -> cpb::Node {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(n) = c.get_node(cpb::GetNodeRequest { name: name.into() }).await {
            let n = n.into_inner();
            if n.status == status {
                return n;
            }
        }
        assert!(Instant::now() < end, "node {name} never became {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// VPS `name` as host agent `a` has it.
pub async fn on_agent(a: &mut ferry_cluster_tests::cluster::AgentClient, name: &str) -> apb::Vps {
    a.get_vps(apb::GetVpsRequest { name: name.into() })
        .await
        .unwrap_or_else(|e| panic!("{name} on its agent: {e}"))
        .into_inner()
}

/// A node registration (a controller-only cluster's writes).
pub fn node_req(name: &str, port: u16) -> cpb::RegisterNodeRequest {
    cpb::RegisterNodeRequest {
        name: name.into(),
        addr: format!("10.0.0.1:{port}"),
        capacity: Some(cpb::Capacity {
            cpu_millicores: 4000,
            memory_bytes: 8 << 30,
            disk_bytes: 0,
        }),
        labels: Default::default(),
    }
}

/// Every node the replica behind `c` lists (retried while it finds its
/// leader).
pub async fn list_nodes(c: &mut Ctl) -> Vec<cpb::Node> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match c.list_nodes(cpb::ListNodesRequest {}).await {
            Ok(r) => return r.into_inner().nodes,
            Err(e) => assert!(Instant::now() < end, "list nodes: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
