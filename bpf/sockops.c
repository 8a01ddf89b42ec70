/* sockops: key each redirected connection's original destination by its
 * established 4-tuple, so that the proxy can find it after accept().
 *
 * Attached under the agent's cgroup root next to connect4.c. On the client
 * side's ACTIVE_ESTABLISHED callback (which the kernel runs before the
 * listener can accept the connection) it moves the entry that connect4 parked
 * under the socket cookie to nm_orig_dst, keyed by netns cookie + 4-tuple as
 * seen from the client: src = the client's ephemeral address, dst =
 * 127.0.0.1:15001. The proxy builds the same key from getpeername() and
 * getsockname() of the accepted socket plus its SO_NETNS_COOKIE. Dual-stack
 * sockets redirected by connect6.c are keyed by their IPv4-mapped addresses.
 */
#include "nodemesh.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    if (skops->family != AF_INET && skops->family != AF_INET6)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct nm_orig_dst *orig = nm_pending.lookup(&cookie);
    if (!orig)
        return 1;
    struct nm_flow_key key = {};
    key.netns_cookie = bpf_get_netns_cookie(skops);
    /* Only a v4-mapped connect (connect6.c) parks an entry for an AF_INET6
     * socket: its IPv4 address is the last word, as the proxy's IPv4 listener
     * sees it. Both sets are read unconditionally (into volatile locals): a
     * branch lets clang fold the two loads into one at a computed context
     * offset, which the verifier rejects. */
    volatile __u32 l4 = skops->local_ip4, r4 = skops->remote_ip4;
    volatile __u32 l6 = skops->local_ip6[3], r6 = skops->remote_ip6[3];
    int v6 = skops->family == AF_INET6;
    key.src_ip = v6 ? l6 : l4;
    key.dst_ip = v6 ? r6 : r4;
    key.src_port = (__u16)skops->local_port;
    key.dst_port = (__u16)bpf_ntohl(skops->remote_port);
    struct nm_orig_dst val = *orig;
    if (nm_orig_dst.update(&key, &val) == 0)
        nm_count(NM_SOCKOPS_RECORDED);
    else
        nm_count(NM_SOCKOPS_RECORD_FAILED);
    nm_pending.delete(&cookie);
    return 1;
}
