// SPDX-License-Identifier: GPL-2.0
/*
 * pmm-memserver: the memory server of pseudo_mm's RDMA backend. Exports the contents of one
 * file (template pages, e.g. a pool region), loaded into its memory, read-only over RDMA: every client that connects (rdma_cm,
 * reliable connection) gets, in the accept's private data, where the region is, its rkey
 * and its size, and then reads pages with RDMA READ; the server's CPU takes no part in a
 * read. Usage: pmm-memserver [-p PORT] [-a ADDR] FILE. Prints "LISTENING port=P pages=N"
 * once it accepts connections; runs until killed.
 */
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* What the kernel client expects (pseudo-mm-kmod/rdma.c, struct pmm_rdma_info). */
struct info {
	uint64_t addr;
	uint32_t rkey;
	uint32_t reserved;
	uint64_t size;
} __attribute__((packed));

/* Per client: released when it disconnects. */
struct client {
	struct ibv_pd *pd;
	struct ibv_mr *mr;
	struct ibv_cq *cq;
};

static void *region;
static size_t region_size;

static int accept_client(struct rdma_cm_id *id)
{
	struct client *c = calloc(1, sizeof(*c));
	struct ibv_qp_init_attr qp = { 0 };
	struct rdma_conn_param param = { 0 };
	struct info info;

	if (!c)
		return -1;
	c->pd = ibv_alloc_pd(id->verbs);
	c->cq = c->pd ? ibv_create_cq(id->verbs, 2, NULL, NULL, 0) : NULL;
	/* Remote reads only: nobody may write the template. */
	c->mr = c->cq ? ibv_reg_mr(c->pd, region, region_size, IBV_ACCESS_REMOTE_READ) : NULL;
	if (!c->mr) {
		fprintf(stderr, "pmm-memserver: registering the region: %s\n", strerror(errno));
		goto fail;
	}
	qp.send_cq = c->cq;
	qp.recv_cq = c->cq;
	qp.qp_type = IBV_QPT_RC;
	qp.cap.max_send_wr = 1;
	qp.cap.max_recv_wr = 1;
	qp.cap.max_send_sge = 1;
	qp.cap.max_recv_sge = 1;
	if (rdma_create_qp(id, c->pd, &qp)) {
		fprintf(stderr, "pmm-memserver: creating a queue pair: %s\n", strerror(errno));
		goto fail;
	}
	info.addr = htole64((uint64_t)(uintptr_t)region);
	info.rkey = htole32(c->mr->rkey);
	info.reserved = 0;
	info.size = htole64(region_size);
	param.private_data = &info;
	param.private_data_len = sizeof(info);
	param.responder_resources = 4;	/* RDMA READs in flight per client */
	param.initiator_depth = 1;
	param.rnr_retry_count = 7;
	id->context = c;
	if (rdma_accept(id, &param)) {
		fprintf(stderr, "pmm-memserver: accept: %s\n", strerror(errno));
		rdma_destroy_qp(id);
		goto fail;
	}
	return 0;
fail:
	if (c->mr)
		ibv_dereg_mr(c->mr);
	if (c->cq)
		ibv_destroy_cq(c->cq);
	if (c->pd)
		ibv_dealloc_pd(c->pd);
	free(c);
	id->context = NULL;
	rdma_reject(id, NULL, 0);
	return -1;
}

static void drop_client(struct rdma_cm_id *id)
{
	struct client *c = id->context;

	if (!c)
		return;
	rdma_destroy_qp(id);
	ibv_dereg_mr(c->mr);
	ibv_destroy_cq(c->cq);
	ibv_dealloc_pd(c->pd);
	free(c);
	id->context = NULL;
}

int main(int argc, char **argv)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	struct rdma_event_channel *ec;
	struct rdma_cm_id *listener;
	struct rdma_cm_event *ev;
	int port = 7471, opt, fd;
	struct stat st;

	while ((opt = getopt(argc, argv, "p:a:")) != -1) {
		if (opt == 'p')
			port = atoi(optarg);
		else if (opt == 'a' && inet_pton(AF_INET, optarg, &sin.sin_addr) != 1)
			return fprintf(stderr, "pmm-memserver: bad address %s\n", optarg), 2;
	}
	if (optind != argc - 1 || port <= 0 || port > 65535) {
		fprintf(stderr, "usage: pmm-memserver [-p PORT] [-a ADDR] FILE\n");
		return 2;
	}
	fd = open(argv[optind], O_RDONLY);
	if (fd < 0 || fstat(fd, &st) || st.st_size <= 0 || st.st_size % 4096) {
		fprintf(stderr, "pmm-memserver: %s: not a readable file of whole pages\n", argv[optind]);
		return 1;
	}
	region_size = (size_t)st.st_size;
	/*
	 * The server's own memory, read from the file: what an RDMA device can pin for good
	 * whatever holds the file (long-term pins of file pages are refused on some file
	 * systems), and what a memory server is for.
	 */
	region = mmap(NULL, region_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED) {
		perror("pmm-memserver: mmap");
		return 1;
	}
	for (size_t off = 0; off < region_size;) {
		ssize_t n = pread(fd, (char *)region + off, region_size - off, (off_t)off);

		if (n <= 0) {
			fprintf(stderr, "pmm-memserver: reading %s: %s\n", argv[optind],
				n ? strerror(errno) : "short file");
			return 1;
		}
		off += (size_t)n;
	}
	close(fd);
	signal(SIGPIPE, SIG_IGN);
	sin.sin_port = htons((uint16_t)port);
	ec = rdma_create_event_channel();
	if (!ec || rdma_create_id(ec, &listener, NULL, RDMA_PS_TCP) ||
	    rdma_bind_addr(listener, (struct sockaddr *)&sin) || rdma_listen(listener, 16)) {
		fprintf(stderr, "pmm-memserver: listening on port %d: %s\n", port, strerror(errno));
		return 1;
	}
	printf("LISTENING port=%d pages=%zu\n", port, region_size / 4096);
	fflush(stdout);
	while (rdma_get_cm_event(ec, &ev) == 0) {
		struct rdma_cm_id *id = ev->id;
		enum rdma_cm_event_type type = ev->event;

		rdma_ack_cm_event(ev);
		switch (type) {
		case RDMA_CM_EVENT_CONNECT_REQUEST:
			if (accept_client(id))
				rdma_destroy_id(id);
			break;
		case RDMA_CM_EVENT_ESTABLISHED:
			printf("CONNECTED\n");
			fflush(stdout);
			break;
		case RDMA_CM_EVENT_DISCONNECTED:
			rdma_disconnect(id);
			drop_client(id);
			rdma_destroy_id(id);
			break;
		default:
			break;
		}
	}
	return 0;
}
