//! Which devices a VPS may use, as one list for both hierarchies: v1 writes it
//! to `devices.allow`, v2 compiles it to an eBPF program of type
//! BPF_PROG_TYPE_CGROUP_DEVICE attached to the VPS's cgroup (cgroup v2 has no
//! device controller; the kernel asks the program instead). Everything not
//! listed is denied.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevKind {
    Char,
    Block,
}

/// Access bits as the kernel's BPF context encodes them.
pub const MKNOD: u32 = 1;
pub const READ: u32 = 2;
pub const WRITE: u32 = 4;
const RWM: u32 = MKNOD | READ | WRITE;

#[derive(Debug, Clone, Copy)]
pub struct DeviceRule {
    pub kind: DevKind,
    /// None = any.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

const fn dev(kind: DevKind, major: u32, minor: Option<u32>, access: u32) -> DeviceRule {
    DeviceRule {
        kind,
        major: Some(major),
        minor,
        access,
    }
}

/// The VPS device policy: mknod of anything (opening is what matters), and
/// null, zero, full, random, urandom, tty, console, ptmx, the pts slaves, tun, fuse.
pub const VPS_DEVICES: &[DeviceRule] = &[
    DeviceRule {
        kind: DevKind::Char,
        major: None,
        minor: None,
        access: MKNOD,
    },
    DeviceRule {
        kind: DevKind::Block,
        major: None,
        minor: None,
        access: MKNOD,
    },
    dev(DevKind::Char, 1, Some(3), RWM),
    dev(DevKind::Char, 1, Some(5), RWM),
    dev(DevKind::Char, 1, Some(7), RWM),
    dev(DevKind::Char, 1, Some(8), RWM),
    dev(DevKind::Char, 1, Some(9), RWM),
    dev(DevKind::Char, 5, Some(0), RWM),
    dev(DevKind::Char, 5, Some(1), RWM),
    dev(DevKind::Char, 5, Some(2), RWM),
    dev(DevKind::Char, 136, None, RWM),
    dev(DevKind::Char, 10, Some(200), RWM),
    dev(DevKind::Char, 10, Some(229), RWM),
];

impl DeviceRule {
    /// The v1 `devices.allow` line, e.g. `c 1:3 rwm`.
    pub fn v1_line(&self) -> String {
        let k = match self.kind {
            DevKind::Char => 'c',
            DevKind::Block => 'b',
        };
        let num = |n: Option<u32>| n.map(|v| v.to_string()).unwrap_or_else(|| "*".into());
        let mut acc = String::new();
        for (bit, ch) in [(READ, 'r'), (WRITE, 'w'), (MKNOD, 'm')] {
            if self.access & bit != 0 {
                acc.push(ch);
            }
        }
        format!("{k} {}:{} {acc}", num(self.major), num(self.minor))
    }
}

/// One eBPF instruction (struct bpf_insn).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}
// Opcodes used (class | op | source).
const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
const MOV64_X: u8 = 0xbf; // r_dst = r_src
const MOV64_K: u8 = 0xb7; // r_dst = imm
const AND32_K: u8 = 0x54; // w_dst &= imm
const RSH32_K: u8 = 0x74; // w_dst >>= imm
const JNE_K: u8 = 0x55; // if r_dst != imm goto +off
const EXIT: u8 = 0x95;

/// Compiles the rules into a program that returns 1 (allow) for a listed access
/// and 0 (EPERM) for everything else. Registers: r1 the context, r3 the device
/// type, r4 the access bits, r5 major, r6 minor, r7 scratch.
pub fn compile(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0), // access_type
        insn(MOV64_X, 3, 2, 0, 0),
        insn(AND32_K, 3, 0, 0, 0xffff), // type
        insn(MOV64_X, 4, 2, 0, 0),
        insn(RSH32_K, 4, 0, 0, 16), // access
        insn(LDX_W, 5, 1, 4, 0),    // major
        insn(LDX_W, 6, 1, 8, 0),    // minor
    ];
    for r in rules {
        let ty = match r.kind {
            DevKind::Block => 1,
            DevKind::Char => 2,
        };
        // Each test jumps to the end of this rule's block when it fails.
        let mut block: Vec<(Insn, bool)> = vec![(insn(JNE_K, 3, 0, 0, ty), true)];
        if let Some(m) = r.major {
            block.push((insn(JNE_K, 5, 0, 0, m as i32), true));
        }
        if let Some(m) = r.minor {
            block.push((insn(JNE_K, 6, 0, 0, m as i32), true));
        }
        let denied = RWM & !r.access;
        if denied != 0 {
            block.push((insn(MOV64_X, 7, 4, 0, 0), false));
            block.push((insn(AND32_K, 7, 0, 0, denied as i32), false));
            block.push((insn(JNE_K, 7, 0, 0, 0), true));
        }
        block.push((insn(MOV64_K, 0, 0, 0, 1), false));
        block.push((insn(EXIT, 0, 0, 0, 0), false));
        let len = block.len();
        for (i, (mut ins, skips)) in block.into_iter().enumerate() {
            if skips {
                ins.off = (len - i - 1) as i16;
            }
            p.push(ins);
        }
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, fully initialized #[repr(C)] prefix of union
    // bpf_attr; its size is passed, and the kernel copies it in.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads the program for `rules` and attaches it to the cgroup v2 directory
/// `dir` (replacing what was there). The attachment lives as long as the cgroup.
pub fn attach(dir: &Path, rules: &[DeviceRule]) -> std::io::Result<()> {
    let prog = compile(rules);
    let license = b"Apache-2.0\0";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"ferry_devs\0");
    let load = |log: &mut [u8]| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: prog.len() as u32,
            insns: prog.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            // The kernel refuses a log buffer with log level 0.
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            prog_name: name,
            ..Default::default()
        };
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    // Without a log first (a full log buffer is itself an error); on failure
    // again with one, to say what the verifier did not like.
    let fd = match load(&mut []) {
        Ok(fd) => fd,
        Err(e) => {
            let mut log = vec![0u8; 1 << 20];
            if let Ok(fd) = load(&mut log) {
                // SAFETY: a descriptor the kernel just gave us; closing it.
                drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            }
            let text = String::from_utf8_lossy(&log);
            let tail: String = text
                .trim_end_matches('\0')
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ");
            return Err(std::io::Error::new(
                e.kind(),
                format!("loading the device filter: {e}; verifier: {tail}"),
            ));
        }
    };
    // SAFETY: BPF_PROG_LOAD returned a new descriptor that we now own.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let cg = std::fs::File::open(dir)?;
    let mut at = ProgAttachAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut at)
        .map_err(|e| std::io::Error::new(e.kind(), format!("attaching the device filter: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a compiled program the way the kernel would, for a given access.
    fn eval(p: &[Insn], ty: u32, access: u32, major: u32, minor: u32) -> u64 {
        let mut r = [0u64; 11];
        let ctx = [(access << 16) | ty, major, minor];
        let mut pc = 0;
        loop {
            let i = p[pc];
            let (d, s) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => r[d] = ctx[i.off as usize / 4] as u64,
                MOV64_X => r[d] = r[s],
                MOV64_K => r[d] = i.imm as u64,
                AND32_K => r[d] = ((r[d] as u32) & i.imm as u32) as u64,
                RSH32_K => r[d] = ((r[d] as u32) >> i.imm) as u64,
                JNE_K => {
                    if r[d] != i.imm as u32 as u64 {
                        pc += i.off as usize
                    }
                }
                EXIT => return r[0],
                c => panic!("opcode {c:x}"),
            }
        }
    }

    #[test]
    fn program_allows_exactly_the_list() {
        let p = compile(VPS_DEVICES);
        let (c, b) = (2, 1);
        assert_eq!(eval(&p, c, READ | WRITE, 1, 3), 1, "/dev/null rw");
        assert_eq!(eval(&p, c, READ, 136, 7), 1, "pts slave");
        assert_eq!(eval(&p, c, MKNOD, 8, 0), 1, "mknod of anything");
        assert_eq!(eval(&p, b, MKNOD, 8, 0), 1);
        assert_eq!(eval(&p, b, READ, 8, 0), 0, "a disk");
        assert_eq!(eval(&p, c, READ, 1, 11), 0, "kmsg");
        assert_eq!(eval(&p, c, READ | MKNOD, 1, 1), 0, "mem");
        assert_eq!(eval(&p, b, READ, 1, 3), 0, "block 1:3 is not char 1:3");
    }

    #[test]
    fn v1_lines() {
        assert_eq!(VPS_DEVICES[0].v1_line(), "c *:* m");
        assert_eq!(VPS_DEVICES[2].v1_line(), "c 1:3 rwm");
        assert_eq!(VPS_DEVICES[10].v1_line(), "c 136:* rwm");
    }
}
