//! The network lock while CRIU dumps a VPS: the host end of its veth is taken
//! down, so nothing reaches the frozen tasks' sockets and nothing leaves them
//! (a packet processed mid-dump would make the dumped TCP state disagree with
//! the peer's). Links are set with one ioctl each, fast enough to run inside
//! CRIU's notifications.
//!
//! Why not CRIU's own nftables lock: CRIU records the lock method in the
//! images, and every restore then deletes the dump's table in the VPS's new
//! netns, where it never existed. The kernel takes a failed nftables
//! transaction back with an RCU grace period: 10-25 ms inside the restore's
//! frozen window, on every migration. Taking the link down costs nothing on
//! the target, whose netns and veth are new.
//!
//! Loopback traffic between the VPS's own frozen tasks is not blocked; only
//! a timer could move it then (a delayed ACK, which TCP's sequence numbers
//! make harmless either way).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Takes the link `name` (in this process's netns) down or up. Bringing up a
/// link that no longer exists succeeds.
pub fn set_link(name: &str, up: bool) -> std::io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    // SAFETY: socket() takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned here alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data (a name and a union of integers and
    // pointers); all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags of the
    // ifreq we own; the name is NUL-terminated (shorter than IFNAMSIZ).
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        let e = std::io::Error::last_os_error();
        // A link that is gone locks nothing.
        if up && e.raw_os_error() == Some(libc::ENODEV) {
            return Ok(());
        }
        return Err(e);
    }
    // SAFETY: SIOCGIFFLAGS just filled ifru_flags, the union's active field.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let iff_up = libc::IFF_UP as libc::c_short;
    let want = if up { flags | iff_up } else { flags & !iff_up };
    if want == flags {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = want;
    // SAFETY: SIOCSIFFLAGS reads the name and ifru_flags of our ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_cannot_be_a_link_name() {
        assert!(set_link("", false).is_err());
        assert!(set_link("a-name-longer-than-ifnamsiz", false).is_err());
    }

    #[test]
    fn a_missing_link_is_not_locked() {
        assert!(set_link("ferrynolink0", true).is_ok());
        assert!(set_link("ferrynolink0", false).is_err());
    }
}
