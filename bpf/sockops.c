/* sockops: key each redirected connection's original destination by its
 * established 4-tuple, so that the proxy can find it after accept().
 *
 * Attached under the agent's cgroup root next to connect4.c. On the client
 * side's ACTIVE_ESTABLISHED callback (which the kernel runs before the
 * listener can accept the connection) it moves the entry that connect4 parked
 * under the socket cookie to nm_orig_dst, keyed by netns cookie + 4-tuple as
 * seen from the client: src = the client's ephemeral address, dst =
 * 127.0.0.1:15001. The proxy builds the same key from getpeername() and
 * getsockname() of the accepted socket plus its SO_NETNS_COOKIE.
 */
#include "nodemesh.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || skops->family != AF_INET)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct nm_orig_dst *orig = nm_pending.lookup(&cookie);
    if (!orig)
        return 1;
    struct nm_flow_key key = {};
    key.netns_cookie = bpf_get_netns_cookie(skops);
    key.src_ip = skops->local_ip4;
    key.dst_ip = skops->remote_ip4;
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
