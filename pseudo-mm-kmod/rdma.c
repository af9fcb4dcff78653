// SPDX-License-Identifier: GPL-2.0
/*
 * pseudo_mm's RDMA backend transport: a reliable connection (RC queue pair, rdma_cm) to a
 * memory server that exports template pages as one memory region; up to PMM_RDMA_BATCH
 * consecutive pages are fetched with one RDMA READ scattered into pages of ours.
 *
 * The server answers the connection request with struct pmm_rdma_info as private data
 * (where its region is, its rkey, its size). Every wait is bounded: address and route
 * resolution, the connection, and each READ (the backend's timeout). A READ that fails or
 * times out loses the connection for good (the queue pair is moved to the error state by a
 * disconnect, which flushes what is outstanding); the backend then answers every fault that
 * needs the server with SIGBUS, and keeps serving the pages it fetched already.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/completion.h>
#include <linux/in.h>
#include <linux/slab.h>
#include <rdma/ib_verbs.h>
#include <rdma/rdma_cm.h>

#include "rdma.h"

#define PMM_RDMA_RESOLVE_MS 2000

/* What the server sends in its accept: little-endian. */
struct pmm_rdma_info {
	__le64 addr;
	__le32 rkey;
	__le32 reserved;
	__le64 size;
} __packed;

struct pmm_rdma {
	struct rdma_cm_id *cm;
	struct ib_pd *pd;
	struct ib_cq *cq;
	struct completion cm_done;
	int cm_error;
	atomic_t lost;
	u64 remote_addr;
	u32 rkey;
	u64 pages;
	unsigned long timeout;	/* jiffies, per READ */
};

struct pmm_rdma_read {
	struct ib_cqe cqe;
	struct completion done;
	enum ib_wc_status status;
};

static void cm_finish(struct pmm_rdma *r, int err)
{
	r->cm_error = err;
	complete(&r->cm_done);
}

static int pmm_rdma_cm_event(struct rdma_cm_id *id, struct rdma_cm_event *ev)
{
	struct pmm_rdma *r = id->context;
	struct pmm_rdma_info info;
	int err;

	switch (ev->event) {
	case RDMA_CM_EVENT_ADDR_RESOLVED:
		err = rdma_resolve_route(id, PMM_RDMA_RESOLVE_MS);
		if (err)
			cm_finish(r, err);
		break;
	case RDMA_CM_EVENT_ROUTE_RESOLVED:
		cm_finish(r, 0);
		break;
	case RDMA_CM_EVENT_ESTABLISHED:
		if (!ev->param.conn.private_data ||
		    ev->param.conn.private_data_len < sizeof(info)) {
			cm_finish(r, -EPROTO);
			break;
		}
		memcpy(&info, ev->param.conn.private_data, sizeof(info));
		r->remote_addr = le64_to_cpu(info.addr);
		r->rkey = le32_to_cpu(info.rkey);
		r->pages = le64_to_cpu(info.size) >> PAGE_SHIFT;
		cm_finish(r, r->pages ? 0 : -EPROTO);
		break;
	case RDMA_CM_EVENT_REJECTED:
		cm_finish(r, -ECONNREFUSED);
		break;
	case RDMA_CM_EVENT_ADDR_ERROR:
	case RDMA_CM_EVENT_ROUTE_ERROR:
	case RDMA_CM_EVENT_CONNECT_ERROR:
	case RDMA_CM_EVENT_UNREACHABLE:
		cm_finish(r, -EHOSTUNREACH);
		break;
	case RDMA_CM_EVENT_DISCONNECTED:
	case RDMA_CM_EVENT_DEVICE_REMOVAL:
	case RDMA_CM_EVENT_TIMEWAIT_EXIT:
		atomic_set(&r->lost, 1);
		break;
	default:
		break;
	}
	return 0;
}

/* Runs one step of the connection and waits for its event, bounded. */
static int cm_step(struct pmm_rdma *r, int err)
{
	if (err)
		return err;
	if (!wait_for_completion_timeout(&r->cm_done, r->timeout + msecs_to_jiffies(PMM_RDMA_RESOLVE_MS)))
		return -ETIMEDOUT;
	reinit_completion(&r->cm_done);
	return r->cm_error;
}

struct pmm_rdma *pmm_rdma_connect(__be32 addr, __be16 port, unsigned int timeout_ms, u64 *pages)
{
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = addr, .sin_port = port };
	struct ib_qp_init_attr qp = {
		.qp_type = IB_QPT_RC,
		.sq_sig_type = IB_SIGNAL_REQ_WR,
		.cap = {
			.max_send_wr = 4,
			.max_recv_wr = 1,
			.max_send_sge = PMM_RDMA_BATCH,
			.max_recv_sge = 1,
		},
	};
	struct rdma_conn_param param = {
		.initiator_depth = 1,
		.responder_resources = 1,
		.retry_count = 3,
		.rnr_retry_count = 3,
	};
	struct pmm_rdma *r;
	int err;

	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r)
		return ERR_PTR(-ENOMEM);
	init_completion(&r->cm_done);
	r->timeout = msecs_to_jiffies(timeout_ms);
	r->cm = rdma_create_id(&init_net, pmm_rdma_cm_event, r, RDMA_PS_TCP, IB_QPT_RC);
	if (IS_ERR(r->cm)) {
		err = PTR_ERR(r->cm);
		kfree(r);
		return ERR_PTR(err);
	}
	/* One wait: the handler resolves the route once the address is, and wakes us then. */
	err = cm_step(r, rdma_resolve_addr(r->cm, NULL, (struct sockaddr *)&sin, PMM_RDMA_RESOLVE_MS));
	if (err)
		goto out_id;
	r->pd = ib_alloc_pd(r->cm->device, 0);
	if (IS_ERR(r->pd)) {
		err = PTR_ERR(r->pd);
		goto out_id;
	}
	r->cq = ib_alloc_cq(r->cm->device, r, 8, 0, IB_POLL_SOFTIRQ);
	if (IS_ERR(r->cq)) {
		err = PTR_ERR(r->cq);
		goto out_pd;
	}
	qp.send_cq = r->cq;
	qp.recv_cq = r->cq;
	err = rdma_create_qp(r->cm, r->pd, &qp);
	if (err)
		goto out_cq;
	err = cm_step(r, rdma_connect(r->cm, &param));
	if (err)
		goto out_qp;
	*pages = r->pages;
	return r;

out_qp:
	rdma_destroy_qp(r->cm);
out_cq:
	ib_free_cq(r->cq);
out_pd:
	ib_dealloc_pd(r->pd);
out_id:
	rdma_destroy_id(r->cm);
	kfree(r);
	return ERR_PTR(err);
}

static void pmm_rdma_read_done(struct ib_cq *cq, struct ib_wc *wc)
{
	struct pmm_rdma_read *rd = container_of(wc->wr_cqe, struct pmm_rdma_read, cqe);

	rd->status = wc->status;
	complete(&rd->done);
}

bool pmm_rdma_lost(const struct pmm_rdma *r)
{
	return atomic_read(&r->lost);
}

int pmm_rdma_fetch(struct pmm_rdma *r, pgoff_t index, struct page **pages, unsigned int n)
{
	struct ib_device *dev = r->cm->device;
	struct ib_sge sge[PMM_RDMA_BATCH];
	const struct ib_send_wr *bad;
	struct pmm_rdma_read *rd;
	struct ib_rdma_wr wr = { };
	unsigned int i, mapped = 0;
	int err = 0;

	if (pmm_rdma_lost(r))
		return -ENOTCONN;
	if (!n || n > PMM_RDMA_BATCH || index >= r->pages || n > r->pages - index)
		return -EINVAL;
	rd = kzalloc(sizeof(*rd), GFP_KERNEL);
	if (!rd)
		return -ENOMEM;
	init_completion(&rd->done);
	rd->cqe.done = pmm_rdma_read_done;
	for (; mapped < n; mapped++) {
		sge[mapped].addr = ib_dma_map_page(dev, pages[mapped], 0, PAGE_SIZE, DMA_FROM_DEVICE);
		if (ib_dma_mapping_error(dev, sge[mapped].addr)) {
			err = -EIO;
			goto out;
		}
		sge[mapped].length = PAGE_SIZE;
		sge[mapped].lkey = r->pd->local_dma_lkey;
	}
	/* One READ of the n consecutive remote pages, scattered into ours: one round trip. */
	wr.wr.wr_cqe = &rd->cqe;
	wr.wr.sg_list = sge;
	wr.wr.num_sge = n;
	wr.wr.opcode = IB_WR_RDMA_READ;
	wr.wr.send_flags = IB_SEND_SIGNALED;
	wr.remote_addr = r->remote_addr + ((u64)index << PAGE_SHIFT);
	wr.rkey = r->rkey;
	err = ib_post_send(r->cm->qp, &wr.wr, &bad);
	if (err)
		goto out;
	if (!wait_for_completion_timeout(&rd->done, r->timeout)) {
		/* The server or the link is gone: the disconnect flushes the request. */
		atomic_set(&r->lost, 1);
		rdma_disconnect(r->cm);
		if (!wait_for_completion_timeout(&rd->done, r->timeout)) {
			pr_err("RDMA read of pages %lu+%u not given back by the device: pages leaked\n",
			       index, n);
			return -EINPROGRESS;
		}
		err = -ETIMEDOUT;
	} else if (rd->status != IB_WC_SUCCESS) {
		pr_warn("RDMA read of pages %lu+%u failed: %s\n", index, n,
			ib_wc_status_msg(rd->status));
		rdma_disconnect(r->cm);
		err = -EIO;
	}
out:
	if (err)
		atomic_set(&r->lost, 1);
	for (i = 0; i < mapped; i++)
		ib_dma_unmap_page(dev, sge[i].addr, PAGE_SIZE, DMA_FROM_DEVICE);
	kfree(rd);
	return err;
}

void pmm_rdma_destroy(struct pmm_rdma *r)
{
	rdma_disconnect(r->cm);
	rdma_destroy_qp(r->cm);
	ib_free_cq(r->cq);
	ib_dealloc_pd(r->pd);
	rdma_destroy_id(r->cm);
	kfree(r);
}
