/* cgroup/connect6: the same selective redirection for IPv4-mapped IPv6.
 *
 * Dual-stack clients (grpcio, Java, Go with some settings) open AF_INET6
 * sockets and connect to ::ffff:a.b.c.d even for an IPv4 VIP; connect4 never
 * sees those connects. For a v4-mapped destination this program applies
 * connect4's rule (enrolled netns AND mesh service, else untouched) and
 * rewrites to ::ffff:127.0.0.1:15001, which the IPv4 in-pod listener accepts.
 * Native IPv6 destinations pass untouched: IPv6 services are not meshed yet.
 */
#include "nodemesh.h"

int nm_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != NM_SOCK_STREAM) {
        nm_count(NM_CONNECT4_PASS_OTHER);
        return 1;
    }
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
        return 1;  /* native IPv6: not ours (yet) */
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
    key.ip = ctx->user_ip6[3];
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
    ctx->user_ip6[3] = bpf_htonl(NM_LOOPBACK_IP4);
    ctx->user_port = bpf_htons(NM_OUTBOUND_PORT);
    nm_count(NM_CONNECT4_REDIRECTED);
    return 1;
}
