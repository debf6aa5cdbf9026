//! `recvmmsg(2)` into buffers with headroom: a relay receives a peer's
//! datagram at an offset so that the framing it sends on (ChannelData header,
//! Data indication) is written in front of the payload instead of copying it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Receive buffers for up to `slots` datagrams per call, each with
/// `headroom` bytes free before and `tailroom` after the payload.
pub struct HeadroomBatch {
    bufs: Vec<Box<[u8]>>,
    headroom: usize,
    max_payload: usize,
    lens: Vec<usize>,
    from: Vec<SocketAddr>,
    filled: usize,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` only ever point into
// buffers this struct owns (boxed, so they do not move with it) and are
// rewritten at the start of every `recv`, which takes `&mut self`; nothing
// is shared, so moving the batch to another thread is sound.
unsafe impl Send for HeadroomBatch {}

impl std::fmt::Debug for HeadroomBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadroomBatch")
            .field("slots", &self.bufs.len())
            .field("filled", &self.filled)
            .finish()
    }
}

impl HeadroomBatch {
    /// Buffers for `slots` datagrams of up to `max_payload` bytes.
    pub fn new(
        slots: usize,
        headroom: usize,
        max_payload: usize,
        tailroom: usize,
    ) -> HeadroomBatch {
        let slots = slots.max(1);
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        HeadroomBatch {
            bufs: (0..slots)
                .map(|_| vec![0u8; headroom + max_payload + tailroom].into_boxed_slice())
                .collect(),
            headroom,
            max_payload,
            lens: vec![0; slots],
            from: vec![unspecified; slots],
            filled: 0,
            // SAFETY: all-zero bytes are a valid value of these plain C
            // structs (null pointers and zero lengths).
            names: (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect(),
            iovs: (0..slots)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: as above.
            hdrs: (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect(),
        }
    }

    /// Datagrams received by the last call.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// True when the last call received nothing.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Datagram `i`: its whole buffer, where its payload sits, its sender.
    pub fn get_mut(&mut self, i: usize) -> (&mut [u8], Range<usize>, SocketAddr) {
        let range = self.headroom..self.headroom + self.lens[i];
        (&mut self.bufs[i], range, self.from[i])
    }

    /// One non-blocking `recvmmsg` on `fd`; `WouldBlock` when nothing waits.
    /// Datagrams longer than `max_payload` are truncated by the kernel;
    /// their length is reported as received (the caller sees garbage that
    /// fails to frame, never an overrun).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.filled = 0;
        let n = self.bufs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                // SAFETY: `headroom < len` by construction; the pointer stays
                // inside the boxed slice, which outlives the call.
                iov_base: unsafe { self.bufs[i].as_mut_ptr().add(self.headroom) }.cast(),
                iov_len: self.max_payload,
            };
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers owned by `self` that are
        // not otherwise borrowed during the call; `n` matches their count.
        let got = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        for i in 0..got {
            self.lens[i] = (self.hdrs[i].msg_len as usize).min(self.max_payload);
            self.from[i] = sockaddr_to_std(&self.names[i])
                .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        }
        self.filled = got;
        Ok(got)
    }
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in when the family says so;
            // sockaddr_storage is large and aligned enough for it.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `SOL_UDP` and `UDP_SEGMENT` (linux/udp.h): UDP generic segmentation
/// offload, several same-sized datagrams to one destination in one send.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
/// Most segments and payload bytes in one GSO send (kernel limits: 64
/// segments in older kernels, 64 KiB per IP packet).
const MAX_GSO_SEGMENTS: usize = 64;
const MAX_GSO_BYTES: usize = 60_000;

/// One message of a `sendmmsg`: a run of queued datagrams to one
/// destination, all of `segment` bytes (one datagram when `count == 1`).
#[derive(Clone, Debug)]
struct Run {
    first: usize,
    count: usize,
    segment: usize,
    bytes: Range<usize>,
}

/// Control-message space for a UDP_SEGMENT and a PKTINFO cmsg, 8-byte
/// aligned.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; 96]);

/// Datagrams queued for one socket and sent with one `sendmmsg(2)`; runs of
/// same-sized datagrams to one destination leave as one GSO send (the kernel
/// segments them late, so a run costs about as much as one datagram). The
/// payloads are copied into an arena reused across flushes.
pub struct SendBatch {
    arena: Vec<u8>,
    entries: Vec<(socket2::SockAddr, Range<usize>, Option<IpAddr>)>,
    capacity: usize,
    gso: bool,
    runs: Vec<Run>,
    controls: Vec<Control>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` are rebuilt from owned data
// at every flush (which takes `&mut self`) and never dereferenced otherwise.
unsafe impl Send for SendBatch {}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("queued", &self.entries.len())
            .field("gso", &self.gso)
            .finish()
    }
}

impl SendBatch {
    /// A batch of up to `capacity` datagrams, using GSO where the kernel
    /// supports it.
    pub fn new(capacity: usize) -> SendBatch {
        let capacity = capacity.max(1);
        SendBatch {
            arena: Vec::with_capacity(capacity * 1500),
            entries: Vec::with_capacity(capacity),
            capacity,
            gso: true,
            runs: Vec::with_capacity(capacity),
            controls: vec![Control([0; 96]); capacity],
            iovs: Vec::with_capacity(capacity),
            hdrs: Vec::with_capacity(capacity),
        }
    }

    /// Turns GSO off (one datagram per message).
    pub fn without_gso(mut self) -> SendBatch {
        self.gso = false;
        self
    }

    /// Queued datagrams.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when the next push needs a flush first.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.arena.clear();
    }

    /// Queues `payload` for `to`.
    pub fn push(&mut self, to: SocketAddr, payload: &[u8]) {
        self.push_from(to, None, payload);
    }

    /// Queues `payload` for `to`, sent from source address `from` (a
    /// socket bound to a wildcard address answers from the address the
    /// client used, IP_PKTINFO / IPV6_PKTINFO).
    pub fn push_from(&mut self, to: SocketAddr, from: Option<IpAddr>, payload: &[u8]) {
        let start = self.arena.len();
        self.arena.extend_from_slice(payload);
        self.entries
            .push((socket2::SockAddr::from(to), start..self.arena.len(), from));
    }

    /// Groups the queued datagrams (from `from` on) into messages.
    fn plan(&mut self, from: usize) {
        self.runs.clear();
        for i in from..self.entries.len() {
            let (addr, range, src) = &self.entries[i];
            let len = range.len();
            if self.gso
                && let Some(run) = self.runs.last_mut()
            {
                let first = &self.entries[run.first];
                let same_dest = first.0 == *addr && first.2 == *src;
                if same_dest
                    && len == run.segment
                    && run.count < MAX_GSO_SEGMENTS
                    && run.bytes.len() + len <= MAX_GSO_BYTES
                {
                    run.count += 1;
                    run.bytes.end = range.end;
                    continue;
                }
            }
            self.runs.push(Run {
                first: i,
                count: 1,
                segment: len,
                bytes: range.clone(),
            });
        }
    }

    /// Sends everything queued on `fd` and empties the batch. Returns how
    /// many datagrams the kernel did not take (a full buffer or an error:
    /// UDP's answer to overload is a drop, which the caller counts).
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> usize {
        let mut failed = 0;
        let mut next = 0; // first entry not yet handled
        while next < self.entries.len() {
            self.plan(next);
            if self.controls.len() < self.runs.len() {
                // More queued than the capacity promised: grow once.
                self.controls.resize(self.runs.len(), Control([0; 96]));
            }
            self.iovs.clear();
            self.hdrs.clear();
            for run in &self.runs {
                self.iovs.push(libc::iovec {
                    // SAFETY: the range lies inside the arena, which is not
                    // touched until the call returns.
                    iov_base: unsafe { self.arena.as_ptr().add(run.bytes.start) }
                        as *mut libc::c_void,
                    iov_len: run.bytes.len(),
                });
                // SAFETY: a zeroed mmsghdr is a valid empty header.
                self.hdrs.push(unsafe { std::mem::zeroed() });
            }
            for (k, run) in self.runs.iter().enumerate() {
                let (addr, _, src) = &self.entries[run.first];
                let h = &mut self.hdrs[k].msg_hdr;
                h.msg_name = addr.as_ptr() as *mut libc::c_void;
                h.msg_namelen = addr.len();
                h.msg_iov = &mut self.iovs[k];
                h.msg_iovlen = 1;
                if run.count > 1 || src.is_some() {
                    let control = &mut self.controls[k];
                    control.0 = [0; 96];
                    h.msg_control = control.0.as_mut_ptr().cast();
                    h.msg_controllen = control.0.len() as _;
                    // SAFETY: the header points at `control`, 8-byte aligned
                    // and large enough for a UDP_SEGMENT cmsg (2 bytes) and
                    // a PKTINFO cmsg (at most 20 bytes); CMSG_NXTHDR walks
                    // inside msg_controllen, which is trimmed to what was
                    // written before the call.
                    unsafe {
                        let mut used = 0usize;
                        let mut cmsg = libc::CMSG_FIRSTHDR(h);
                        if run.count > 1 {
                            (*cmsg).cmsg_level = SOL_UDP;
                            (*cmsg).cmsg_type = UDP_SEGMENT;
                            (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
                            std::ptr::write_unaligned(
                                libc::CMSG_DATA(cmsg).cast::<u16>(),
                                run.segment as u16,
                            );
                            used += libc::CMSG_SPACE(2) as usize;
                            cmsg = libc::CMSG_NXTHDR(h, cmsg);
                        }
                        match src {
                            Some(IpAddr::V4(ip)) => {
                                let info = libc::in_pktinfo {
                                    ipi_ifindex: 0,
                                    ipi_spec_dst: libc::in_addr {
                                        s_addr: u32::from(*ip).to_be(),
                                    },
                                    ipi_addr: libc::in_addr { s_addr: 0 },
                                };
                                let n = std::mem::size_of::<libc::in_pktinfo>() as u32;
                                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                                (*cmsg).cmsg_len = libc::CMSG_LEN(n) as _;
                                std::ptr::write_unaligned(
                                    libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>(),
                                    info,
                                );
                                used += libc::CMSG_SPACE(n) as usize;
                            }
                            Some(IpAddr::V6(ip)) => {
                                let info = libc::in6_pktinfo {
                                    ipi6_addr: libc::in6_addr {
                                        s6_addr: ip.octets(),
                                    },
                                    ipi6_ifindex: 0,
                                };
                                let n = std::mem::size_of::<libc::in6_pktinfo>() as u32;
                                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                                (*cmsg).cmsg_len = libc::CMSG_LEN(n) as _;
                                std::ptr::write_unaligned(
                                    libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>(),
                                    info,
                                );
                                used += libc::CMSG_SPACE(n) as usize;
                            }
                            None => {}
                        }
                        h.msg_controllen = used as _;
                    }
                }
            }
            // SAFETY: headers point at live iovecs, addresses, control
            // buffers and arena bytes owned by `self` for the whole call.
            let n = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    self.hdrs.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                let sent_runs = n as usize;
                next = self.runs[sent_runs - 1].first + self.runs[sent_runs - 1].count;
                continue;
            }
            let err = io::Error::last_os_error();
            let first = self.runs[0].clone();
            if first.count > 1
                && matches!(
                    err.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
                )
            {
                // No GSO here (device or kernel): send one by one from now on.
                self.gso = false;
                continue;
            }
            // The first message failed (full buffer, or an ICMP error
            // reported for an earlier send): drop it and go on.
            failed += first.count;
            next = first.first + first.count;
        }
        self.entries.clear();
        self.arena.clear();
        failed
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn gso_runs_arrive_as_separate_datagrams() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        other
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = SendBatch::new(32);
        // A run of 10 equal datagrams, one of another size, one elsewhere.
        for i in 0..10u8 {
            batch.push(rx.local_addr().unwrap(), &[i; 100]);
        }
        batch.push(rx.local_addr().unwrap(), &[99; 7]);
        batch.push(other.local_addr().unwrap(), &[42; 100]);
        assert_eq!(batch.flush(tx.as_fd()), 0);
        let mut buf = [0u8; 2048];
        for i in 0..10u8 {
            let (n, _) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 100][..], "segment {i}");
        }
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[99; 7]);
        let (n, _) = other.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[42; 100][..]);
    }

    #[test]
    fn a_wildcard_socket_sends_from_the_chosen_address() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = tx.local_addr().unwrap().port();
        let mut batch = SendBatch::new(8);
        for src in ["127.0.0.2", "127.0.0.3", "127.0.0.3"] {
            batch.push_from(
                rx.local_addr().unwrap(),
                Some(src.parse().unwrap()),
                &[1; 50],
            );
        }
        assert_eq!(batch.flush(tx.as_fd()), 0);
        let mut buf = [0u8; 64];
        for src in ["127.0.0.2", "127.0.0.3", "127.0.0.3"] {
            let (_, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(from, SocketAddr::new(src.parse().unwrap(), port));
        }
    }

    #[test]
    fn send_batch_delivers_every_datagram_in_order() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = SendBatch::new(4);
        for i in 0..4u8 {
            batch.push(rx.local_addr().unwrap(), &[i; 3]);
        }
        assert!(batch.is_full());
        assert_eq!(batch.flush(tx.as_fd()), 0);
        assert!(batch.is_empty());
        let mut buf = [0u8; 16];
        for i in 0..4u8 {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 3]);
            assert_eq!(from, tx.local_addr().unwrap());
        }
    }

    #[test]
    fn receives_a_batch_at_the_headroom_offset() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = HeadroomBatch::new(8, 48, 1500, 3);
        assert_eq!(
            batch.recv(rx.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        for i in 0..5u8 {
            tx.send_to(&[i; 10], rx.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(batch.recv(rx.as_fd()).unwrap(), 5);
        for i in 0..5 {
            let (buf, range, from) = batch.get_mut(i);
            assert_eq!(range, 48..58);
            assert_eq!(&buf[range], &[i as u8; 10]);
            assert_eq!(from, tx.local_addr().unwrap());
        }
    }
}
