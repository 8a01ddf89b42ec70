/* Shared definitions of nodemesh's BPF programs: map layouts, counters and
 * constants. agent/bpf_layout.py mirrors every struct here with ctypes; keep
 * the two in step (tests/test_bpf_layout.py compares their sizes).
 *
 * Byte order: IPv4 addresses are kept exactly as the kernel hands them
 * (network order); ports are kept in host order, so that user space can
 * compare them with ordinary integers.
 */
#ifndef NODEMESH_H
#define NODEMESH_H

#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/in.h>

/* The in-pod listener that captured connections are steered to. */
#define NM_LOOPBACK_IP4   0x7f000001   /* 127.0.0.1, host order */
#define NM_OUTBOUND_PORT  15001
#define NM_SOCK_STREAM    1            /* SOCK_STREAM, not in the uapi headers */

/* SO_MARK carried by the node proxy's own upstream sockets: never redirected,
 * even when the proxy's cgroup sits under the attach point (as a DaemonSet
 * pod under kubepods does). */
#define NM_PROXY_MARK     0x539

/* A mesh service, VIP:port. */
struct nm_svc_key {
    __u32 ip;     /* network order */
    __u16 port;   /* host order */
    __u16 pad;
};

struct nm_svc_val {
    __u32 id;     /* agent-assigned service-port id, for diagnostics */
};

/* Where an intercepted connection was going. */
struct nm_orig_dst {
    __u32 ip;     /* network order */
    __u16 port;   /* host order */
    __u16 pad;
};

/* An established client connection to the in-pod listener, as the proxy sees
 * it after accept(): the netns plus the 4-tuple from the client's side. */
struct nm_flow_key {
    __u64 netns_cookie;
    __u32 src_ip;     /* network order */
    __u32 dst_ip;     /* network order */
    __u16 src_port;   /* host order */
    __u16 dst_port;   /* host order */
    __u32 pad;
};

/* Indexes of the per-CPU counter array. */
enum nm_counter {
    NM_CONNECT4_REDIRECTED = 0,   /* enrolled netns, mesh service: rewritten */
    NM_CONNECT4_PASS_NOT_ENROLLED,/* netns not enrolled: untouched */
    NM_CONNECT4_PASS_NOT_SERVICE, /* enrolled, but not a mesh service */
    NM_CONNECT4_PASS_PROXY,       /* the proxy's own socket (SO_MARK) */
    NM_CONNECT4_PASS_OTHER,       /* not TCP */
    NM_SOCKOPS_RECORDED,          /* original destination keyed by 4-tuple */
    NM_SOCKOPS_RECORD_FAILED,     /* could not record (map update failed) */
    NM_COUNTER_MAX,
};

#define NM_MAX_SERVICES   65536
#define NM_MAX_ENROLLED   4096
#define NM_MAX_FLOWS      65536

#ifndef NM_SPLICE_MODULE
/* Maps, shared by all programs of one load. */
BPF_HASH(nm_enrolled, __u64, __u32, NM_MAX_ENROLLED);                 /* netns cookie -> 1 */
BPF_HASH(nm_services, struct nm_svc_key, struct nm_svc_val, NM_MAX_SERVICES);
/* socket cookie -> original destination, between connect() and establishment.
 * LRU: a connect that never completes must not leak an entry. */
BPF_TABLE("lru_hash", __u64, struct nm_orig_dst, nm_pending, NM_MAX_FLOWS);
/* established flow -> original destination, read (and deleted) by the proxy. */
BPF_TABLE("lru_hash", struct nm_flow_key, struct nm_orig_dst, nm_orig_dst, NM_MAX_FLOWS);
BPF_PERCPU_ARRAY(nm_counters, __u64, NM_COUNTER_MAX);

static __always_inline void nm_count(int idx)
{
    __u64 *v = nm_counters.lookup(&idx);
    if (v)
        *v += 1;
}

/* The redirect rule shared by connect4.c and connect6.c, for a TCP connect to
 * the IPv4 destination ip (network order) : port (network order, as in ctx).
 * Returns 1 when the caller must rewrite the destination to the in-pod
 * listener; the original destination is then parked under the socket cookie
 * for sockops.c. Counts every outcome. */
static __always_inline int nm_should_redirect(struct bpf_sock_addr *ctx, __u32 ip, __u32 port)
{
    if (ctx->type != NM_SOCK_STREAM) {
        nm_count(NM_CONNECT4_PASS_OTHER);
        return 0;
    }
    struct bpf_sock *sk = ctx->sk;
    if (sk && sk->mark == NM_PROXY_MARK) {
        nm_count(NM_CONNECT4_PASS_PROXY);
        return 0;
    }
    __u64 netns = bpf_get_netns_cookie(ctx);
    if (!nm_enrolled.lookup(&netns)) {
        nm_count(NM_CONNECT4_PASS_NOT_ENROLLED);
        return 0;
    }
    struct nm_svc_key key = {};
    key.ip = ip;
    key.port = bpf_ntohs((__u16)port);
    if (!nm_services.lookup(&key)) {
        nm_count(NM_CONNECT4_PASS_NOT_SERVICE);
        return 0;
    }
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_orig_dst orig = {};
    orig.ip = key.ip;
    orig.port = key.port;
    nm_pending.update(&cookie, &orig);
    nm_count(NM_CONNECT4_REDIRECTED);
    return 1;
}

#else
/* The sockmap L4 engine (--l4-engine sockmap, bpf/sk_skb.c), compiled as a
 * module of its own (agent/bpf_loader.py): the proxy's spliced socket pairs,
 * keyed by socket cookie, and each socket's peer. */
#define NM_MAX_SPLICED    65536
struct nm_peer_val {
    __u64 peer;       /* the peer socket's cookie (its key in nm_splice) */
    __u64 bytes;      /* bytes redirected from this socket to its peer */
    __u32 passthru;   /* 1: a redirect failed once, so this direction stays in
                       * user space for good (keeps the byte order) */
    __u32 pad;
};
BPF_SOCKHASH(nm_splice, __u64, NM_MAX_SPLICED);
BPF_HASH(nm_peer, __u64, struct nm_peer_val, NM_MAX_SPLICED);
#endif

#endif
