//! Property tests over the agent's parsers of untrusted input: template
//! archives (raw tar headers, so hostile names and links get through the
//! builder) and VPS specs. No panic; nothing outside the staging root is
//! touched; a spec that validates keeps every bound. No root needed.

use ferry_agent::spec::{validate_spec, Capacity, MAX_PIDS};
use ferry_agent::template::{unpack, ImportLimits};
use ferry_proto::agent::v1 as pb;
use proptest::prelude::*;
use tar::EntryType;

const NAMES: &[&str] = &[
    "a", "a/b", "evil", "evil/x", "./a/../b", "/abs", "../up", "dev/sda", "a/b/c", "evil/a/b",
];

fn tar_entry() -> impl Strategy<Value = (String, EntryType, Vec<u8>, String)> {
    (
        prop::sample::select(NAMES),
        prop::sample::select(
            &[
                EntryType::Regular,
                EntryType::Directory,
                EntryType::Symlink,
                EntryType::Link,
                EntryType::Fifo,
                EntryType::Block,
            ][..],
        ),
        prop::collection::vec(any::<u8>(), 0..32),
        prop::sample::select(&["@OUT", "/etc/passwd", "../../x", "a", "evil/x"][..]),
    )
        .prop_map(|(n, k, d, l)| (n.to_string(), k, d, l.to_string()))
}

fn raw_tar(entries: &[(String, EntryType, Vec<u8>, String)], out: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        if let Some(gnu) = h.as_gnu_mut() {
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_mode(0o755);
        h.set_size(if *kind == EntryType::Regular {
            data.len() as u64
        } else {
            0
        });
        let link = if link == "@OUT" { out } else { link.as_str() };
        let _ = h.set_link_name(link);
        h.set_cksum();
        let body: &[u8] = if *kind == EntryType::Regular {
            data
        } else {
            &[]
        };
        let _ = b.append(&h, body);
    }
    b.into_inner().unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn a_random_archive_never_reaches_outside(entries in prop::collection::vec(tar_entry(), 1..16)) {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"host").unwrap();
        let bytes = raw_tar(&entries, &outside.to_string_lossy());
        let _ = unpack(&bytes[..], None, &root, ImportLimits { max_bytes: 1 << 20, max_entries: 100 });
        let names: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        prop_assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
        prop_assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"host".to_vec());
    }

    #[test]
    fn a_spec_that_validates_keeps_every_bound(
        name in "[a-z0-9-]{0,70}",
        ip in prop::sample::select(&["10.77.0.5", "10.77.255.255", "192.168.1.5", "0.0.0.0", "x", ""][..]),
        gateway in prop::sample::select(&["", "10.77.0.1", "192.168.1.1", "bogus"][..]),
        prefix in 0u32..40,
        memory in prop::sample::select(&[0u64, 1, 64 << 20, 1 << 30, u64::MAX][..]),
        swap in prop::sample::select(&[0u64, 1 << 30, u64::MAX][..]),
        pids in prop::sample::select(&[0u32, 7, 512, MAX_PIDS, MAX_PIDS + 1, u32::MAX][..]),
        cpu in any::<u32>(),
    ) {
        let cap = Capacity { cpu_millicores: 2000, memory_bytes: 2 << 30 };
        let bridge: ipnet::Ipv4Net = "10.77.0.1/16".parse().unwrap();
        let spec = pb::VpsSpec {
            name,
            template: "busybox".into(),
            limits: Some(pb::Limits {
                memory_bytes: memory,
                swap_bytes: swap,
                pids,
                cpu_millicores: cpu,
                ..Default::default()
            }),
            net: (!ip.is_empty()).then(|| pb::NetConfig {
                ip: ip.into(),
                gateway: gateway.into(),
                prefix_len: prefix,
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Ok(c) = validate_spec(&spec, cap, bridge) {
            prop_assert!(c.limits.pids <= MAX_PIDS && c.limits.pids >= 8);
            prop_assert!(c.limits.memory_bytes <= cap.memory_bytes);
            prop_assert!(c.limits.swap_bytes <= cap.memory_bytes * 4);
            prop_assert!(c.limits.cpu_millicores <= cap.cpu_millicores);
            if let Some(n) = &c.net {
                prop_assert!(bridge.contains(&n.ip) && n.ip != bridge.addr());
            }
        }
    }
}
