/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * netch_wire.h - THE definition of the NetChannel wire format and of every BPF map layout.
 *
 * This header is included by the XDP program (clang -target bpf) and by the C++ stack alike, so
 * it is plain C on top of <linux/types.h>: fixed-width, big-endian on the wire (__be*), packed by
 * construction (every field naturally aligned, sizes checked below). Nothing else in the tree may
 * define a header layout, a map key/value or a counter index. docs/WIRE.md draws these bytes.
 *
 * Frame:  Ethernet | IPv4 (DF, no fragments) | UDP (dport = configured port, sport = per channel)
 *         | nc_chan_hdr (+ SACK blocks, hdr_len bytes) | chan payload (payload_len bytes)
 * A DATA channel packet carries exactly one NetChannel segment as its payload:
 *         nc_hdr (hdr_len bytes) | segment payload (payload_len bytes)
 * Control channel packets (SYN, ACK, ...) carry transport-private payload (or none).
 */
#ifndef NETCH_BPF_NETCH_WIRE_H_
#define NETCH_BPF_NETCH_WIRE_H_

#include <linux/types.h>

/* ---- constants ------------------------------------------------------------------------------ */

#define NC_WIRE_VERSION 2
#define NC_DEFAULT_UDP_PORT 9909

/* Channel ids are 16 bit on the wire; the maps are indexed by them. Id 0 means "not assigned yet"
 * (a channel handshake before the peer has told us its id). */
#define NC_MAX_CHANNELS 1024
#define NC_CHAN_UNASSIGNED 0

/* XSKMAP slots [0, NC_MAX_QUEUES) are the per-queue default sockets that receive handshakes
 * (dst_chan == 0); channels may be steered to any slot. */
#define NC_MAX_QUEUES 64
#define NC_MAX_XSKS 256

/* IPv4 header with options is at most 60 bytes. */
#define NC_IPV4_MAX_HLEN 60

/* Parts-per-million scale for drop probabilities. */
#define NC_PPM 1000000u

/* ---- channel transport header (the AF_XDP driver's reliable transport) ---------------------- */

/* The channel handshake is SCTP's four-way exchange with a stateless cookie, so that a responder
 * keeps no state until the initiator has proved it receives at its source address:
 *   SYN          initiator -> responder   dst_chan 0; nc_chan_hs with the initiator's token/ISN
 *   SYN_ACK      responder -> initiator   the cookie (the responder's token), no state kept
 *   COOKIE_ECHO  initiator -> responder   dst_chan 0; the cookie back: the channel is created now
 *   COOKIE_ACK   responder -> initiator   src_chan = the responder's new channel id
 * The four carry exactly one struct nc_chan_hs as channel payload. */
enum nc_chan_type {
  NC_CT_DATA = 1,        /* carries one NetChannel segment; consumes one sequence number */
  NC_CT_ACK = 2,         /* pure acknowledgement / window update, no payload */
  NC_CT_SYN = 3,         /* channel handshake request; dst_chan 0 */
  NC_CT_SYN_ACK = 4,     /* stateless reply carrying the cookie */
  NC_CT_FIN = 5,         /* orderly channel teardown; seq must be in the receiver's window */
  NC_CT_RST = 6,         /* abort; seq must be in the receiver's window once established */
  NC_CT_KEEPALIVE = 7,   /* liveness probe; answered by an ACK */
  NC_CT_COOKIE_ECHO = 8, /* the initiator returns the cookie; dst_chan 0 */
  NC_CT_COOKIE_ACK = 9,  /* the responder created the channel; src_chan is its id */
  NC_CT_MAX = 9,
};

/* nc_chan_hdr.flags */
#define NC_CF_ECE 0x01 /* ECN-echo: the receiver saw CE marks (DCTCP-style feedback) */
#define NC_CF_CWR 0x02 /* sender reduced its window in response to ECE */

struct nc_chan_hdr {
  __u8 version;    /* NC_WIRE_VERSION */
  __u8 type;       /* enum nc_chan_type */
  __u8 flags;      /* NC_CF_* */
  __u8 hdr_len;    /* bytes: sizeof(nc_chan_hdr) + 8 * number of SACK blocks */
  __be16 dst_chan; /* receiver's channel id: the XDP steering key */
  __be16 src_chan; /* sender's channel id */
  __be32 seq;      /* DATA: this packet's sequence number; others: next seq the sender will use */
  __be32 ack;      /* cumulative ack: every packet with seq < ack has been received */
  __be32 wnd;      /* receive window: bytes the receiver can still accept beyond ack */
  __be32 ts_val;   /* sender timestamp (us) for RTT measurement */
  __be32 ts_ecr;   /* echo of the most recent ts_val received */
  __be16 payload_len; /* bytes after hdr_len; hdr_len + payload_len == UDP length - 8 */
  __be16 rsvd;        /* zero on send, ignored on receive */
  __be64 token;       /* the receiver's channel token (getrandom / keyed cookie): a packet for an
                       * established channel without it is forged and dropped (XDP and driver).
                       * SYN and COOKIE_ECHO carry 0 / the cookie: see nc_chan_hs */
};

/* Channel payload of SYN, SYN_ACK, COOKIE_ECHO and COOKIE_ACK. Tokens are what each end expects
 * to find in nc_chan_hdr.token of the packets it receives. */
struct nc_chan_hs {
  __be64 init_token;  /* chosen by the initiator (CSPRNG) */
  __be64 resp_token;  /* the cookie: keyed hash of the SYN's fields and cookie_time; 0 in SYN */
  __be64 incarnation; /* the sender's stack instance (random at start): a new value from a known
                       * peer address means the peer restarted, and its old channels are gone */
  __be32 init_isn;    /* the initiator's first sequence number */
  __be32 resp_isn;    /* the responder's, derived from the cookie; 0 in SYN */
  __be32 cookie_time; /* the responder's clock (coarse) when it minted the cookie */
  __be32 rsvd;
};

/* Kernel-TCP driver: the first bytes each end writes on a channel's TCP connection. The
 * kernel's handshake already proved the initiator's address and TCP's sequence numbers guard the
 * stream, so the hello only binds the two ends: the responder echoes the initiator's token (an
 * answer that does not is refused) and both carry their stack incarnation (a known peer address
 * with a new one restarted: its old channels fail). After it: records, a __be32 length followed
 * by one NetChannel segment; length 0 is the goodbye of an orderly close. */
#define NC_TCP_HELLO_MAGIC 0x4e435443u /* "NCTC" */
struct nc_tcp_hello {
  __be32 magic;
  __u8 version; /* NC_WIRE_VERSION */
  __u8 rsvd[3];
  __be64 token;       /* the sender's (CSPRNG) */
  __be64 echo_token;  /* the initiator's token in the responder's hello; 0 in the initiator's */
  __be64 incarnation; /* the sender's stack instance */
};

/* Selective acknowledgement block: packets [start, end) were received. Follows nc_chan_hdr. */
struct nc_sack_block {
  __be32 start;
  __be32 end;
};

/* ---- NetChannel (virtual socket) header ----------------------------------------------------- */

enum nc_type {
  NC_DATA = 1,    /* stream bytes [seq, seq + payload_len) of a virtual socket */
  NC_SYN = 2,     /* NCSYN: open a virtual-socket connection (2-way: channels are reliable);
                   * seq = the sender's initial receive window (NCSYN_ACK likewise) */
  NC_SYN_ACK = 3, /* NCSYN_ACK: accept it */
  NC_FIN = 4,     /* no more data after seq; orderly close of one direction */
  NC_RST = 5,     /* abort / no listener on dst_port */
  NC_WND = 6,     /* the receiver's window: it takes stream bytes below seq (a right edge) */
  NC_DRAIN = 7,   /* channel scale-down: the sender puts nothing more on this channel (ports 0) */
  NC_TYPE_MAX = 7,
};

/* Application class, carried explicitly in NCSYN/NCSYN_ACK (the reference implementation had to
 * infer it from SO_PRIORITY and from channel accept order). */
enum nc_app_class {
  NC_CLASS_UNSPEC = 0,
  NC_CLASS_LATENCY = 1,    /* L-app: latency-sensitive */
  NC_CLASS_THROUGHPUT = 2, /* T-app: throughput-bound */
};

struct nc_hdr {
  __u8 type;       /* enum nc_type */
  __u8 app_class;  /* enum nc_app_class; meaningful on NC_SYN / NC_SYN_ACK */
  __u8 hdr_len;    /* bytes, >= sizeof(struct nc_hdr); room for future options */
  __u8 flags;      /* zero for now */
  __be16 src_port; /* virtual-socket ports: the demux key together with conn_id */
  __be16 dst_port;
  __be32 conn_id;     /* random per connection, chosen by the connector; rejects stale segments */
  __be32 payload_len; /* segment payload bytes following hdr_len */
  __be64 seq;         /* virtual-socket byte sequence of the first payload byte; never wraps */
};

/* ---- BPF maps: keys and values ----------------------------------------------------------------
 */

/* nc_config: ARRAY, 1 entry, key __u32 0. Read by the XDP program on every packet. */
struct nc_config {
  __be16 udp_port;       /* NetChannel UDP destination port, network order */
  __be16 tcp_fault_port; /* tests only: drop_ppm also drops TCP segments to or from this port,
                          * so the kernel-TCP driver sees the same loss as the AF_XDP one; 0 off */
  __u32 drop_ppm;        /* fault injection for all channels (tests only), parts per million */
  __u64 generation;      /* bumped by the controller on every change: cheap change detection */
  __u32 ce_ppm; /* tests only: mark CE on this share of ECN-capable NetChannel packets, as a
                 * congested switch would (drives DCTCP); parts per million */
  __u32 pad;
};

/* nc_channels: ARRAY (mmapable), key __u32 channel id, NC_MAX_CHANNELS entries. */
#define NC_STEER_ACTIVE 0x1
struct nc_chan_steer {
  __u32 flags;    /* NC_STEER_ACTIVE when the channel exists on this host */
  __u32 queue;    /* rx queue the channel's packets must arrive on */
  __u32 xsk_slot; /* index into nc_xsks */
  __u32 drop_ppm; /* per-channel fault injection, parts per million */
  __u64 token;    /* nc_chan_hdr.token every packet for this channel must carry (network order) */
};

/* nc_chan_stats: PERCPU_ARRAY, key __u32 channel id (0 = unassigned/handshake traffic). */
struct nc_chan_stats {
  __u64 rx_packets;
  __u64 rx_bytes;
  __u64 fault_drops;
  __u64 ce_marked; /* packets the program marked CE (ce_ppm) */
  /* Frames for the channel that arrived on another rx queue (dropped): a router or a NIC's RSS,
   * not our tx queue, chose their queue. A handshake that timed out with these names it. */
  __u64 wrong_queue;
};

/* nc_counters: PERCPU_ARRAY of __u64, key = enum nc_counter. One slot per verdict reason, so
 * every packet the program sees lands in exactly one counter. X(enum suffix, metric label). */
#define NC_COUNTER_LIST(X)                                                                        \
  X(PASS_NOT_IPV4, "pass_not_ipv4")               /* ARP, IPv6, VLAN-tagged, ... */               \
  X(PASS_UNPARSED, "pass_unparsed")               /* too short / bad IHL to tell what it is */    \
  X(PASS_NOT_UDP, "pass_not_udp")                 /* ICMP, TCP, ... */                            \
  X(PASS_FRAGMENT, "pass_fragment")               /* IPv4 fragments: the kernel reassembles */    \
  X(PASS_OTHER_PORT, "pass_other_port")           /* UDP, not our port */                         \
  X(REDIRECT, "redirect")                         /* valid NetChannel packet sent to its XSK */   \
  X(DROP_TRUNCATED, "drop_truncated")             /* frame shorter than its headers claim */      \
  X(DROP_BAD_IP_LEN, "drop_bad_ip_len")           /* IPv4 total length inconsistent */            \
  X(DROP_BAD_IP_CSUM, "drop_bad_ip_csum")         /* IPv4 header checksum wrong */                \
  X(DROP_BAD_UDP_LEN, "drop_bad_udp_len")         /* UDP length != IP payload length */           \
  X(DROP_BAD_VERSION, "drop_bad_version")         /* nc_chan_hdr.version unknown */               \
  X(DROP_BAD_HDR_LEN, "drop_bad_hdr_len")         /* nc_chan_hdr.hdr_len malformed */             \
  X(DROP_BAD_TYPE, "drop_bad_type")               /* unknown channel packet type */               \
  X(DROP_BAD_PAYLOAD_LEN, "drop_bad_payload_len") /* hdr_len + payload_len != UDP payload */      \
  X(DROP_BAD_NC_HDR, "drop_bad_nc_hdr")           /* DATA whose NetChannel header is malformed */ \
  X(DROP_UNKNOWN_CHANNEL, "drop_unknown_channel") /* dst_chan not active here */                  \
  X(DROP_WRONG_QUEUE, "drop_wrong_queue") /* arrived on a queue the channel is not bound to */    \
  X(DROP_NO_XSK, "drop_no_xsk")           /* channel's XSK slot is empty */                       \
  X(DROP_FAULT, "drop_fault")             /* fault injection */                                   \
  X(DROP_BAD_TOKEN, "drop_bad_token")     /* wrong channel token: forged or stale */

enum nc_counter {
#define NC_X_ENUM(name, label) NC_CNT_##name,
  NC_COUNTER_LIST(NC_X_ENUM)
#undef NC_X_ENUM
      NC_CNT_MAX
};

/* ---- layout checks: the same bytes for BPF and C++ ------------------------------------------ */

#ifdef __cplusplus
#define NC_STATIC_ASSERT static_assert
#else
#define NC_STATIC_ASSERT _Static_assert
#endif
NC_STATIC_ASSERT(sizeof(struct nc_chan_hdr) == 40, "nc_chan_hdr is 40 bytes");
NC_STATIC_ASSERT(sizeof(struct nc_chan_hs) == 40, "nc_chan_hs is 40 bytes");
NC_STATIC_ASSERT(sizeof(struct nc_tcp_hello) == 32, "nc_tcp_hello is 32 bytes");
NC_STATIC_ASSERT(sizeof(struct nc_sack_block) == 8, "nc_sack_block is 8 bytes");
NC_STATIC_ASSERT(sizeof(struct nc_hdr) == 24, "nc_hdr is 24 bytes");
NC_STATIC_ASSERT(sizeof(struct nc_config) == 24, "nc_config is 24 bytes");
NC_STATIC_ASSERT(sizeof(struct nc_chan_steer) == 24, "nc_chan_steer is 24 bytes");
NC_STATIC_ASSERT(sizeof(struct nc_chan_stats) == 40, "nc_chan_stats is 40 bytes");

#endif /* NETCH_BPF_NETCH_WIRE_H_ */
