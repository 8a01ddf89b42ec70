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
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
        return 1;  /* native IPv6: not ours (yet) */
    if (nm_should_redirect(ctx, ctx->user_ip6[3], ctx->user_port)) {
        ctx->user_ip6[3] = bpf_htonl(NM_LOOPBACK_IP4);
        ctx->user_port = bpf_htons(NM_OUTBOUND_PORT);
    }
    return 1;
}
