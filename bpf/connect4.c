/* cgroup/connect4: selective redirection of enrolled pods' mesh traffic.
 *
 * Attached under the agent's cgroup root. A TCP connect() is redirected only
 * when BOTH hold: the socket's netns is enrolled (nm_enrolled) and the
 * destination VIP:port is a mesh service (nm_services). Then the original
 * destination is parked under the socket's cookie (nm_pending, picked up by
 * sockops.c once the connection is established) and the destination is
 * rewritten to the in-pod listener 127.0.0.1:15001. Everything else goes out
 * untouched: this program never refuses a connect.
 */
#include "nodemesh.h"

int nm_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != NM_SOCK_STREAM) {
        nm_count(NM_CONNECT4_PASS_OTHER);
        return 1;
    }
    struct bpf_sock *sk = ctx->sk;
    if (sk && sk->mark == NM_PROXY_MARK) {
        nm_count(NM_CONNECT4_PASS_PROXY);
        return 1;
    }
    __u64 netns = bpf_get_netns_cookie(ctx);
    if (!nm_enrolled.lookup(&netns)) {
        nm_count(NM_CONNECT4_PASS_NOT_ENROLLED);
        return 1;
    }
    struct nm_svc_key key = {};
    key.ip = ctx->user_ip4;
    key.port = bpf_ntohs((__u16)ctx->user_port);
    if (!nm_services.lookup(&key)) {
        nm_count(NM_CONNECT4_PASS_NOT_SERVICE);
        return 1;
    }
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_orig_dst orig = {};
    orig.ip = key.ip;
    orig.port = key.port;
    nm_pending.update(&cookie, &orig);
    ctx->user_ip4 = bpf_htonl(NM_LOOPBACK_IP4);
    ctx->user_port = bpf_htons(NM_OUTBOUND_PORT);
    nm_count(NM_CONNECT4_REDIRECTED);
    return 1;
}
