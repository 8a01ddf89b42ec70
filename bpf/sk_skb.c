/* sk_skb/stream_verdict: the sockmap L4 engine (--l4-engine sockmap, experimental).
 *
 * Attached to the SOCKHASH nm_splice (not to a cgroup), so it runs only for
 * the sockets the proxy put there: the downstream (accepted) and upstream
 * socket of a plain TCP flow, once user space has flushed what it had
 * buffered. For each skb arriving on such a socket it decides where the bytes
 * go:
 *   - an empty skb (a FIN), or the socket has no nm_peer entry: SK_PASS (to
 *     user space, as without us);
 *   - its direction was marked passthru: SK_PASS (user space relays it);
 *   - else redirect it to the egress of the peer socket (nm_splice[peer]) and
 *     count its bytes; when the peer is not in nm_splice (yet, or any more)
 *     the redirect fails: mark the direction passthru and SK_PASS, so that no
 *     byte is dropped and no later byte can overtake one user space holds.
 * FIN is not forwarded: the proxy still sees EOF on each socket and shuts
 * down the peer's write side itself, once the peer has taken every
 * redirected byte (nm_peer.bytes).
 */
#include "nodemesh.h"

int nm_splice_verdict(struct __sk_buff *skb)
{
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct nm_peer_val *p = nm_peer.lookup(&cookie);
    /* A FIN-only skb carries no byte. TCP has already marked the socket
     * RCV_SHUTDOWN when it reaches us, so the proxy sees EOF whatever we
     * return; the skb itself must be dropped, never passed:
     *  - SK_PASS queues it on this socket's psock->ingress_skb whenever that
     *    queue is not empty, and that queue also holds the bytes the peer
     *    redirected to this socket's egress. sk_psock_backlog() then hands
     *    the 0-byte skb to sk_psock_skb_ingress(), which returns 0; the
     *    backlog takes 0 for a hard error: sk_err = EPIPE and TX_ENABLED
     *    cleared, so every byte still queued or redirected later to this
     *    socket is stuck or dropped (net/core/skmsg.c, kernel 6.x).
     *  - redirected, it would reach the peer after the proxy shut the peer's
     *    write side down, and fail it with EPIPE.
     * A passthru direction keeps SK_PASS for its data, but its FIN is dropped
     * too, for the first reason. */
    if (skb->len == 0)
        return SK_DROP;
    if (!p || p->passthru)
        return SK_PASS;
    __u64 peer = p->peer;
    __u32 len = skb->len;
    if (nm_splice.sk_redirect_hash(skb, &peer, 0) != SK_PASS) {
        p->passthru = 1;
        return SK_PASS;
    }
    __sync_fetch_and_add(&p->bytes, len);
    return SK_PASS;  /* with the redirect set by the helper: go to the peer */
}
