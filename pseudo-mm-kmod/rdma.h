/* SPDX-License-Identifier: GPL-2.0 */
/* The RDMA backend's transport: one reliable connection to a memory server. */
#ifndef PSEUDO_MM_RDMA_H
#define PSEUDO_MM_RDMA_H

#include <linux/mm_types.h>
#include <linux/types.h>

struct pmm_rdma;

/* Connects to the server at addr:port (network order); *pages is what it exports. */
struct pmm_rdma *pmm_rdma_connect(__be32 addr, __be16 port, unsigned int timeout_ms, u64 *pages);
/*
 * Reads page `index` of the server's memory into `page`. 0, or -errno: the connection is
 * lost for good after any error. -EINPROGRESS: the device did not give the request back
 * within two timeouts, and may still write `page`: the caller must leak it.
 */
int pmm_rdma_fetch(struct pmm_rdma *r, pgoff_t index, struct page *page);
bool pmm_rdma_lost(const struct pmm_rdma *r);
void pmm_rdma_destroy(struct pmm_rdma *r);

#endif
