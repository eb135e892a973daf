//! Scheduler properties over random clusters: never a full, cordoned or down
//! node; binpack fills the fullest node that fits, spread the emptiest;
//! an unplaceable VPS names why each node was rejected.

use std::collections::BTreeMap;

use ferry_controller::scheduler::{place, PlacementReq, Policy, SchedConfig};
use ferry_controller::state::Desired;
use ferry_controller::state::{
    Capacity, ClusterState, NodeCmd, Request, Response, VpsCmd, VpsSpecData,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct NodeGen {
    cpu: u64,
    mem_gib: u64,
    cordoned: bool,
    down: bool,
}

fn node_gen() -> impl Strategy<Value = NodeGen> {
    (
        1u64..=16,
        1u64..=64,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(cpu, mem_gib, cordoned, down)| NodeGen {
            cpu,
            mem_gib,
            cordoned,
            down,
        })
}

fn cluster(nodes: &[NodeGen], policy: Policy) -> ClusterState {
    let mut s = ClusterState {
        sched: SchedConfig {
            policy,
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            ..Default::default()
        },
        ..Default::default()
    };
    for (i, n) in nodes.iter().enumerate() {
        let name = format!("n{i:02}");
        let r = s.apply(Request::Node(NodeCmd::Register {
            name: name.clone(),
            addr: format!("10.0.0.{i}:7700"),
            capacity: Capacity {
                cpu_millicores: n.cpu * 1000,
                memory_bytes: n.mem_gib << 30,
                disk_bytes: 0,
            },
            labels: BTreeMap::new(),
            now_ms: 0,
        }));
        assert!(matches!(r, Response::Node(_)));
        let rec = s.nodes.get_mut(&name).unwrap();
        rec.cordoned = n.cordoned;
        rec.down = n.down;
    }
    s
}

fn create(s: &mut ClusterState, name: &str, cpu: u32, mem: u64) -> Response {
    s.apply(Request::Vps(VpsCmd::Create {
        spec: Box::new(VpsSpecData {
            name: name.into(),
            cpu_millicores: cpu,
            memory_bytes: mem,
            ..Default::default()
        }),
        pin_node: String::new(),
        node_selector: BTreeMap::new(),
        anti_affinity_group: String::new(),
        desired: Desired::Running,
        allocate_ip: false,
        now_ms: 0,
    }))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn never_overfills_or_uses_unready_nodes(
        nodes in prop::collection::vec(node_gen(), 1..8),
        vpses in prop::collection::vec((100u32..4000, 64u64..8192), 1..60),
        spread in any::<bool>(),
    ) {
        let mut s = cluster(&nodes, if spread { Policy::Spread } else { Policy::Binpack });
        for (i, (cpu, mem_mib)) in vpses.iter().enumerate() {
            let before = s.clone();
            match create(&mut s, &format!("v{i}"), *cpu, mem_mib << 20) {
                Response::Vps(v) => {
                    // The scheduler's allocation index agrees with a full recount.
                    let (idx, count) = s.allocated(&v.node);
                    let on: Vec<_> = s.vps.values().filter(|x| x.node == v.node).collect();
                    prop_assert_eq!(count as usize, on.len());
                    prop_assert_eq!(idx.cpu_millicores, on.iter().map(|x| x.spec.cpu_millicores as u64).sum::<u64>());
                    prop_assert_eq!(idx.memory_bytes, on.iter().map(|x| x.spec.memory_bytes).sum::<u64>());
                    let n = &s.nodes[&v.node];
                    prop_assert!(!n.cordoned && !n.down, "placed on an unready node");
                    let (alloc, _) = s.allocated(&v.node);
                    prop_assert!(alloc.cpu_millicores <= n.capacity.cpu_millicores);
                    prop_assert!(alloc.memory_bytes <= n.capacity.memory_bytes);
                }
                Response::Rejected { message, .. } => {
                    // Refused only when no ready node had room; and nothing changed.
                    prop_assert_eq!(&s, &before);
                    for n in s.nodes.values() {
                        prop_assert!(message.contains(&n.name), "{} not explained in {}", n.name, message);
                    }
                }
                r => prop_assert!(false, "unexpected {:?}", r),
            }
        }
    }

    #[test]
    fn binpack_picks_fullest_and_spread_emptiest(
        nodes in prop::collection::vec(node_gen(), 2..6),
        preload in prop::collection::vec((100u32..2000, 64u64..4096), 0..20),
        spread in any::<bool>(),
    ) {
        let policy = if spread { Policy::Spread } else { Policy::Binpack };
        let mut s = cluster(&nodes, policy);
        for (i, (cpu, mem)) in preload.iter().enumerate() {
            let _ = create(&mut s, &format!("p{i}"), *cpu, mem << 20);
        }
        let sel = BTreeMap::new();
        let req = PlacementReq { template: "", cpu_millicores: 500, memory_bytes: 256 << 20, disk_bytes: 0, pin_node: "", exclude_node: "", node_selector: &sel, anti_affinity_group: "", avoid: &[], migration: false };
        if let Ok((chosen, _)) = place(&s, &req) {
            let full = |name: &str| {
                let n = &s.nodes[name];
                let (a, _) = s.allocated(name);
                ((a.cpu_millicores + 500) as f64 / n.capacity.cpu_millicores as f64
                    + (a.memory_bytes + (256 << 20)) as f64 / n.capacity.memory_bytes as f64) / 2.0
            };
            let fits: Vec<&String> = s.nodes.keys().filter(|n| {
                let rec = &s.nodes[*n];
                let (a, _) = s.allocated(n);
                !rec.cordoned && !rec.down
                    && a.cpu_millicores + 500 <= rec.capacity.cpu_millicores
                    && a.memory_bytes + (256 << 20) <= rec.capacity.memory_bytes
            }).collect();
            for other in fits {
                if spread {
                    prop_assert!(full(&chosen) <= full(other) + 1e-12, "spread chose {} over emptier {}", chosen, other);
                } else {
                    prop_assert!(full(&chosen) + 1e-12 >= full(other), "binpack chose {} over fuller {}", chosen, other);
                }
            }
        }
    }
}

#[test]
fn labels_anti_affinity_and_pinning() {
    let mut s = cluster(
        &[
            NodeGen {
                cpu: 4,
                mem_gib: 8,
                cordoned: false,
                down: false,
            },
            NodeGen {
                cpu: 4,
                mem_gib: 8,
                cordoned: false,
                down: false,
            },
        ],
        Policy::Spread,
    );
    s.nodes
        .get_mut("n01")
        .unwrap()
        .labels
        .insert("ssd".into(), "yes".into());
    let mk = |s: &mut ClusterState, name: &str, sel: &[(&str, &str)], group: &str, pin: &str| {
        s.apply(Request::Vps(VpsCmd::Create {
            spec: Box::new(VpsSpecData {
                name: name.into(),
                cpu_millicores: 100,
                memory_bytes: 64 << 20,
                ..Default::default()
            }),
            pin_node: pin.into(),
            node_selector: sel
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            anti_affinity_group: group.into(),
            desired: Desired::Running,
            allocate_ip: false,
            now_ms: 0,
        }))
    };
    let Response::Vps(v) = mk(&mut s, "a", &[("ssd", "yes")], "", "") else {
        panic!()
    };
    assert_eq!(v.node, "n01");
    let Response::Vps(v) = mk(&mut s, "g1", &[], "db", "") else {
        panic!()
    };
    let Response::Vps(w) = mk(&mut s, "g2", &[], "db", "") else {
        panic!()
    };
    assert_ne!(v.node, w.node, "anti-affinity group split across nodes");
    let Response::Rejected { message, .. } = mk(&mut s, "g3", &[], "db", "") else {
        panic!()
    };
    assert!(message.contains("anti-affinity group db"), "{message}");
    // A node with a nearly full disk takes nothing new, and says so.
    {
        let n = s.nodes.get_mut("n00").unwrap();
        n.capacity.disk_bytes = 100 << 30;
        n.usage.disk_bytes = 96 << 30;
    }
    let Response::Rejected { message, .. } = mk(&mut s, "full", &[], "", "n00") else {
        panic!()
    };
    assert!(message.contains("n00: disk 96% full"), "{message}");
    s.nodes.get_mut("n00").unwrap().usage.disk_bytes = 10 << 30;
    let Response::Vps(v) = mk(&mut s, "pinned", &[], "", "n00") else {
        panic!()
    };
    assert_eq!(v.node, "n00");
    assert!(v.placement_reason.contains("n00"), "{}", v.placement_reason);
}
