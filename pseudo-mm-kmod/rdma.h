/* SPDX-License-Identifier: GPL-2.0 */
/* The RDMA backend's transport: one reliable connection to a memory server. */
#ifndef PSEUDO_MM_RDMA_H
#define PSEUDO_MM_RDMA_H

#include <linux/mm_types.h>
#include <linux/types.h>

struct pmm_rdma;

/* Connects to the server at addr:port (network order); *pages is what it exports. */
struct pmm_rdma *pmm_rdma_connect(__be32 addr, __be16 port, unsigned int timeout_ms, u64 *pages);
/* Pages one fetch reads at most (scatter entries of one RDMA READ). */
#define PMM_RDMA_BATCH 16

/*
 * Reads pages index..index+n-1 of the server's memory into pages[0..n-1] (n <=
 * PMM_RDMA_BATCH). 0, or -errno: the connection is lost for good after any error.
 * -EINPROGRESS: the device did not give the request back within two timeouts, and may
 * still write the pages: the caller must leak them.
 */
int pmm_rdma_fetch(struct pmm_rdma *r, pgoff_t index, struct page **pages, unsigned int n);
bool pmm_rdma_lost(const struct pmm_rdma *r);
void pmm_rdma_destroy(struct pmm_rdma *r);

#endif
