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
    if (nm_should_redirect(ctx, ctx->user_ip4, ctx->user_port)) {
        ctx->user_ip4 = bpf_htonl(NM_LOOPBACK_IP4);
        ctx->user_port = bpf_htons(NM_OUTBOUND_PORT);
    }
    return 1;  /* never refuse a connect */
}
