// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * steer.bpf.c - NetChannel XDP steering (the data-plane assist of the hybrid stack).
 *
 * Every frame ends in exactly one counter of nc_counters. NetChannel frames (IPv4/UDP to the
 * configured port) are validated field by field and redirected into the AF_XDP socket of their
 * channel; malformed ones are dropped; anything that is not identifiably NetChannel is passed to
 * the kernel untouched, so ARP, ICMP, TCP and other UDP keep working on the same interface.
 *
 * The program is xdp.frags-capable: headers must sit in the linear part (they always do: the
 * first buffer is a page), lengths are checked against the whole multi-buffer frame.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "netch_wire.h"

struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, 1);
  __uint(map_flags, BPF_F_MMAPABLE);
  __type(key, __u32);
  __type(value, struct nc_config);
} nc_config SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, NC_MAX_CHANNELS);
  __uint(map_flags, BPF_F_MMAPABLE);
  __type(key, __u32);
  __type(value, struct nc_chan_steer);
} nc_channels SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_XSKMAP);
  __uint(max_entries, NC_MAX_XSKS);
  __type(key, __u32);
  __type(value, __u32);
} nc_xsks SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, NC_CNT_MAX);
  __type(key, __u32);
  __type(value, __u64);
} nc_counters SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, NC_MAX_CHANNELS);
  __type(key, __u32);
  __type(value, struct nc_chan_stats);
} nc_chan_stats SEC(".maps");

static __always_inline void count(__u32 idx) {
  __u64* c = bpf_map_lookup_elem(&nc_counters, &idx);
  if (c) *c += 1;
}

static __always_inline int verdict(__u32 idx, int action) {
  count(idx);
  return action;
}

#define PASS(reason) verdict(NC_CNT_PASS_##reason, XDP_PASS)
#define DROP(reason) verdict(NC_CNT_DROP_##reason, XDP_DROP)

/* The IPv4 header checksum: the kernel is not going to see this packet, so we verify it. The fixed
 * 20 bytes are summed in place; options (rare) are fetched word by word with bpf_xdp_load_bytes so
 * the verifier never has to reason about a variable-offset packet pointer. */
static __always_inline int ipv4_csum_ok(struct xdp_md* ctx, struct iphdr* iph, __u32 ihl_words) {
  __u32 sum = 0;
  __u16* w = (__u16*)iph;
  for (int i = 0; i < 10; i++) sum += w[i];
  __u32 off = sizeof(struct ethhdr) + sizeof(struct iphdr);
  for (__u32 i = 0; i < (NC_IPV4_MAX_HLEN - sizeof(struct iphdr)) / 4; i++) {
    if (i + 5 >= ihl_words) break;
    __u32 word;
    if (bpf_xdp_load_bytes(ctx, off + i * 4, &word, sizeof(word))) return 0;
    sum += (word & 0xffff) + (word >> 16);
  }
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  return sum == 0xffff;
}

/* Fault injection for the kernel-TCP driver's connections (tests only); every other TCP segment
 * passes untouched. */
static __always_inline int tcp_fault(struct xdp_md* ctx, __u32 ihl) {
  __u32 zero = 0;
  struct nc_config* cfg = bpf_map_lookup_elem(&nc_config, &zero);
  if (!cfg || !cfg->tcp_fault_port || !cfg->drop_ppm) return PASS(NOT_UDP);
  __be16 ports[2];
  if (bpf_xdp_load_bytes(ctx, sizeof(struct ethhdr) + ihl * 4, ports, sizeof(ports)))
    return PASS(NOT_UDP);
  if (ports[0] != cfg->tcp_fault_port && ports[1] != cfg->tcp_fault_port) return PASS(NOT_UDP);
  if (bpf_get_prandom_u32() % NC_PPM < cfg->drop_ppm) return DROP(FAULT);
  return PASS(NOT_UDP);
}

SEC("xdp.frags")
int nc_steer(struct xdp_md* ctx) {
  void* data = (void*)(long)ctx->data;
  void* data_end = (void*)(long)ctx->data_end;
  __u32 zero = 0;

  struct ethhdr* eth = data;
  if ((void*)(eth + 1) > data_end) return PASS(UNPARSED);
  if (eth->h_proto != bpf_htons(ETH_P_IP)) return PASS(NOT_IPV4);

  struct iphdr* iph = (void*)(eth + 1);
  if ((void*)(iph + 1) > data_end) return PASS(UNPARSED);
  __u32 ihl = iph->ihl;
  if (iph->version != 4 || ihl < 5) return PASS(UNPARSED);
  if (iph->protocol == IPPROTO_TCP) return tcp_fault(ctx, ihl);
  if (iph->protocol != IPPROTO_UDP) return PASS(NOT_UDP);
  if (iph->frag_off & bpf_htons(0x3fff)) return PASS(FRAGMENT); /* MF or offset != 0 */

  struct udphdr* udp = (void*)iph + ihl * 4;
  if ((void*)(udp + 1) > data_end) return PASS(UNPARSED);

  struct nc_config* cfg = bpf_map_lookup_elem(&nc_config, &zero);
  if (!cfg) return PASS(UNPARSED); /* cannot happen for an array map; keeps the verifier happy */
  if (udp->dest != cfg->udp_port) return PASS(OTHER_PORT);

  /* From here on it is ours: anything wrong is a drop, never a pass. */
  if (!ipv4_csum_ok(ctx, iph, ihl)) return DROP(BAD_IP_CSUM);

  __u32 frame_len = bpf_xdp_get_buff_len(ctx);
  __u32 tot_len = bpf_ntohs(iph->tot_len);
  if (tot_len < ihl * 4 + sizeof(struct udphdr)) return DROP(BAD_IP_LEN);
  if (tot_len > frame_len - sizeof(struct ethhdr)) return DROP(TRUNCATED);
  __u32 udp_len = bpf_ntohs(udp->len);
  if (udp_len != tot_len - ihl * 4) return DROP(BAD_UDP_LEN);

  __u32 chan_len = udp_len - sizeof(struct udphdr); /* bytes of our headers + payload */
  struct nc_chan_hdr* ch = (void*)(udp + 1);
  if (chan_len < sizeof(*ch)) return DROP(TRUNCATED);
  if ((void*)(ch + 1) > data_end) return DROP(TRUNCATED);
  if (ch->version != NC_WIRE_VERSION) return DROP(BAD_VERSION);
  __u32 hlen = ch->hdr_len;
  if (hlen < sizeof(*ch) || (hlen - sizeof(*ch)) % sizeof(struct nc_sack_block) != 0 ||
      hlen > chan_len)
    return DROP(BAD_HDR_LEN);
  __u32 plen = bpf_ntohs(ch->payload_len);
  if (hlen + plen != chan_len) return DROP(BAD_PAYLOAD_LEN);
  __u8 type = ch->type;
  if (type < NC_CT_DATA || type > NC_CT_MAX) return DROP(BAD_TYPE);

  if (type == NC_CT_DATA) {
    /* A DATA packet carries one NetChannel segment; check its header is self-consistent. */
    if (plen < sizeof(struct nc_hdr)) return DROP(BAD_NC_HDR);
    hlen &= 0xff; /* already bounded by the u8 field; tells the verifier */
    struct nc_hdr* nh = (void*)ch + hlen;
    if ((void*)(nh + 1) > data_end) return DROP(TRUNCATED);
    if (nh->type < NC_DATA || nh->type > NC_TYPE_MAX) return DROP(BAD_NC_HDR);
    __u32 nhlen = nh->hdr_len;
    if (nhlen < sizeof(*nh) || nhlen > plen) return DROP(BAD_NC_HDR);
    if (nhlen + bpf_ntohl(nh->payload_len) != plen) return DROP(BAD_NC_HDR);
  } else if (type == NC_CT_SYN || type == NC_CT_SYN_ACK || type == NC_CT_COOKIE_ECHO ||
             type == NC_CT_COOKIE_ACK) {
    if (plen != sizeof(struct nc_chan_hs)) return DROP(BAD_PAYLOAD_LEN);
  } else if (plen != 0) {
    return DROP(BAD_PAYLOAD_LEN); /* ACK, FIN, RST, KEEPALIVE are header-only */
  }

  __u32 chan = bpf_ntohs(ch->dst_chan);
  __u32 slot;
  __u32 drop_ppm = cfg->drop_ppm;
  if (chan == NC_CHAN_UNASSIGNED) {
    /* Only the initiator's handshake packets are addressed before it knows our channel id. */
    if (type != NC_CT_SYN && type != NC_CT_COOKIE_ECHO) return DROP(UNKNOWN_CHANNEL);
    slot = ctx->rx_queue_index;
    if (slot >= NC_MAX_QUEUES) return DROP(WRONG_QUEUE);
  } else {
    if (chan >= NC_MAX_CHANNELS) return DROP(UNKNOWN_CHANNEL);
    struct nc_chan_steer* st = bpf_map_lookup_elem(&nc_channels, &chan);
    if (!st || !(st->flags & NC_STEER_ACTIVE)) return DROP(UNKNOWN_CHANNEL);
    if (st->queue != ctx->rx_queue_index) {
      struct nc_chan_stats* wq = bpf_map_lookup_elem(&nc_chan_stats, &chan);
      if (wq) wq->wrong_queue += 1; /* per-CPU: no atomic needed */
      return DROP(WRONG_QUEUE);
    }
    /* The token is what makes forging cheap to reject: a flood of packets with guessed channel
     * ids never reaches user space. */
    if (ch->token != st->token) return DROP(BAD_TOKEN);
    slot = st->xsk_slot;
    if (st->drop_ppm > drop_ppm) drop_ppm = st->drop_ppm;
  }

  struct nc_chan_stats* cs = bpf_map_lookup_elem(&nc_chan_stats, &chan);
  if (drop_ppm && bpf_get_prandom_u32() % NC_PPM < drop_ppm) {
    if (cs) cs->fault_drops += 1;
    return DROP(FAULT);
  }

  /* ECN fault injection: CE on an ECN-capable packet (ECT(0)/ECT(1)), header checksum updated
   * incrementally (RFC 1624) on the 16-bit word holding version/IHL and TOS. */
  __u8 tos = iph->tos;
  if (cfg->ce_ppm && (tos & 3) && (tos & 3) != 3 && bpf_get_prandom_u32() % NC_PPM < cfg->ce_ppm) {
    __u16 old_w = *(__u16*)iph;
    iph->tos = tos | 3;
    __u16 new_w = *(__u16*)iph;
    __u32 sum = (__u16)~iph->check + (__u16)~old_w + new_w;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    iph->check = (__u16)~sum;
    if (cs) cs->ce_marked += 1;
  }

  long act = bpf_redirect_map(&nc_xsks, slot, 0);
  if (act != XDP_REDIRECT) return DROP(NO_XSK);
  if (cs) {
    cs->rx_packets += 1;
    cs->rx_bytes += frame_len;
  }
  return verdict(NC_CNT_REDIRECT, XDP_REDIRECT);
}

/*
 * nc_txq - tc egress: the kernel-UDP transmit path's queue choice.
 *
 * A channel is bound to one queue on both hosts, and an AF_XDP socket only receives from its own
 * (interface, queue). AF_XDP TX on queue q arrives on the peer's rx queue q; a datagram sent
 * through the kernel's UDP socket would leave on whatever tx queue XPS or the socket hash picks
 * and be dropped at the peer as WRONG_QUEUE. This program looks the sending channel up in
 * nc_channels (src_chan is our id) and pins the datagram to the channel's queue. Everything else
 * leaves untouched.
 *
 * skb->queue_mapping written at tc egress is "queue + 1": 0 means "no choice, let the stack
 * pick" (measured on veth, kernel 6.18: 1 -> queue 0, 4 -> queue 3, 0 -> hashed).
 */
SEC("tc")
int nc_txq(struct __sk_buff* skb) {
  if (skb->protocol != bpf_htons(ETH_P_IP)) return TC_ACT_OK;
  __u32 zero = 0;
  struct nc_config* cfg = bpf_map_lookup_elem(&nc_config, &zero);
  if (!cfg) return TC_ACT_OK;
  __u8 vihl;
  if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &vihl, 1)) return TC_ACT_OK;
  __u32 l4 = sizeof(struct ethhdr) + (vihl & 0xf) * 4;
  __u8 proto;
  if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 9, &proto, 1) || proto != IPPROTO_UDP)
    return TC_ACT_OK;
  struct udphdr udp;
  if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) || udp.dest != cfg->udp_port)
    return TC_ACT_OK;
  __be16 src_chan;
  if (bpf_skb_load_bytes(skb, l4 + sizeof(udp) + __builtin_offsetof(struct nc_chan_hdr, src_chan),
                         &src_chan, sizeof(src_chan)))
    return TC_ACT_OK;
  __u32 chan = bpf_ntohs(src_chan);
  if (chan >= NC_MAX_CHANNELS) return TC_ACT_OK;
  struct nc_chan_steer* st = bpf_map_lookup_elem(&nc_channels, &chan);
  if (!st || !(st->flags & NC_STEER_ACTIVE)) return TC_ACT_OK;
  skb->queue_mapping = st->queue + 1;
  return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
