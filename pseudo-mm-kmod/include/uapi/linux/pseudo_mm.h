/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * /dev/pseudo_mm: memory templates mapped straight from a memory pool.
 *
 * A *backend* is a file of the memory pool, registered by descriptor; the module keeps its
 * own reference, and nobody may write the file while it is registered (as for a running
 * executable: ETXTBSY). Two kinds:
 *  - page cache (PSEUDO_MM_BACKEND_PAGECACHE): a regular file in tmpfs (local DRAM) or in a
 *    file system that reads pages into the page cache; an instance maps the cached page;
 *  - DAX (PSEUDO_MM_BACKEND_DAX): a device-DAX character device (/dev/daxX.Y, PMem or CXL
 *    memory) or a file on a file system mounted with -o dax; an instance maps the device's
 *    own memory. The module holds a reference to every page of the backend while it is
 *    registered, so the device cannot go away under a mapping.
 *  - remote (PSEUDO_MM_BACKEND_RDMA, PSEUDO_MM_REGISTER_REMOTE): a memory server reached over
 *    RDMA (a reliable connection through rdma_cm; RoCE, InfiniBand or Soft-RoCE) that exports
 *    template pages; at a page's first fault the module fetches it (and up to 15 pages
 *    after it that it has not yet) with one RDMA READ, and keeps them for every instance.
 *    A fetch is bounded by the backend's timeout: a lost server or link gives SIGBUS to
 *    the faulting access (and to every later fault that needs the server), never a hang;
 *    pages fetched already stay served.
 *
 * A *template* is a list of *regions*, each a page range of a backend. A process maps a
 * region privately with mmap(2) of /dev/pseudo_mm at offset
 * PSEUDO_MM_MAP_OFFSET(template, region): a read fault maps the backend's page itself (one
 * physical page shared by every instance, never copied); a write copies it into the
 * process's own memory (copy-on-write, charged to its memory cgroup).
 *
 * Requests return 0, or -1 with errno: EINVAL (malformed argument), EFAULT (unreadable or
 * unwritable argument), EBADF (not an open descriptor), ENOENT (no such template or
 * backend), EBUSY (still mapped or used), ETXTBSY (the backend has writers), ENOSPC (a
 * table is full), EEXIST (the template id asked for is taken), ENOTTY (unknown request); for a remote backend ECONNREFUSED, EHOSTUNREACH
 * or ETIMEDOUT (the memory server refused, cannot be reached, or did not answer in time).
 * A template cannot change or go while any process maps it. ADD_REGION's range stays added
 * if the index cannot be written back (EFAULT).
 */
#ifndef _UAPI_LINUX_PSEUDO_MM_H
#define _UAPI_LINUX_PSEUDO_MM_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define PSEUDO_MM_IOC_MAGIC 0x1c

#define PSEUDO_MM_BACKEND_PAGECACHE	1
#define PSEUDO_MM_BACKEND_DAX		2
#define PSEUDO_MM_BACKEND_RDMA		3

struct pseudo_mm_backend {
	__s32 fd;	/* in: an open file, readable */
	__u32 id;	/* out: backend id, > 0 */
	__u64 pages;	/* in: pages of the backend to use, from its start; 0 = its size. A
			 * device-DAX device has no file size: give it. */
	__u32 flags;	/* in: 0 */
	__u32 kind;	/* out: PSEUDO_MM_BACKEND_* */
};

struct pseudo_mm_remote {
	__be32 addr;		/* in: IPv4 address of the memory server */
	__be16 port;		/* in: its rdma_cm port */
	__u16 flags;		/* in: 0 */
	__u32 timeout_ms;	/* in: bound of one fetch (and of connecting); 0 = 5000 */
	__u32 id;		/* out: backend id */
	__u64 pages;		/* out: pages the server exports */
};

/* Create the template under the id given (EEXIST if taken): to make a template again,
 * after a reload, under the id that a process image already names. */
#define PSEUDO_MM_TEMPLATE_AT_ID	1

struct pseudo_mm_template {
	__u32 flags;	/* in: 0 or PSEUDO_MM_TEMPLATE_AT_ID */
	__u32 id;	/* out: template id, > 0; in with PSEUDO_MM_TEMPLATE_AT_ID */
	__u64 tag;	/* in: the caller's name for it, reported by TEMPLATE_INFO */
};

/*
 * A template as it is now. Ids are given round-robin, so a deleted template's id is not
 * soon given again; but a reloaded module starts over, and a caller that keeps ids across
 * reloads (or reboots) checks the tag before it maps or deletes by id.
 */
struct pseudo_mm_template_info {
	__u32 id;	/* in */
	__u32 flags;	/* in: 0 */
	__u64 tag;	/* out: as given at creation */
	__u64 pages;	/* out: pages of all its regions */
	__u32 regions;	/* out */
	__u32 mappings;	/* out: live mmaps of it (each shared by its splits and forks) */
	__u32 backend;	/* out: the backend of its first region; 0 if it has none */
	__u32 reserved;	/* out: 0 */
};

struct pseudo_mm_region {
	__u32 template_id;	/* in */
	__u32 backend_id;	/* in */
	__u64 pgoff;		/* in: first page of the backend */
	__u64 pages;		/* in: > 0, within the backend's size */
	__u32 flags;		/* in: 0 */
	__u32 index;		/* out: the region's index in the template */
};

/* Gauges (templates, backends, regions, vmas) and counters since the module was loaded. */
struct pseudo_mm_stats {
	__u64 templates;
	__u64 backends;
	__u64 regions;
	__u64 vmas;		/* live mappings of regions */
	__u64 read_faults;	/* faults that mapped a backend page as it is */
	__u64 write_faults;	/* first touches by a write: the kernel copied the page */
	__u64 bad_faults;	/* faults the backend could not serve: SIGBUS */
	__u64 around_pages;	/* pages mapped ahead of a read fault (fault-around) */
	__u64 dax_pages;	/* device pages mapped as they are (faults and fault-around) */
	__u64 pinned_pages;	/* pages the module holds: DAX backends', fetched remote pages */
	__u64 rdma_fetches;	/* RDMA reads (each of up to 16 consecutive remote pages) */
	__u64 rdma_errors;	/* of which failed or timed out (the backend is lost then) */
};

#define PSEUDO_MM_REGISTER_BACKEND	_IOWR(PSEUDO_MM_IOC_MAGIC, 1, struct pseudo_mm_backend)
#define PSEUDO_MM_UNREGISTER_BACKEND	_IOW(PSEUDO_MM_IOC_MAGIC, 2, __u32)
#define PSEUDO_MM_CREATE_TEMPLATE	_IOWR(PSEUDO_MM_IOC_MAGIC, 3, struct pseudo_mm_template)
#define PSEUDO_MM_ADD_REGION		_IOWR(PSEUDO_MM_IOC_MAGIC, 4, struct pseudo_mm_region)
#define PSEUDO_MM_DELETE_TEMPLATE	_IOW(PSEUDO_MM_IOC_MAGIC, 5, __u32)
#define PSEUDO_MM_STATS			_IOR(PSEUDO_MM_IOC_MAGIC, 6, struct pseudo_mm_stats)
#define PSEUDO_MM_REGISTER_REMOTE	_IOWR(PSEUDO_MM_IOC_MAGIC, 7, struct pseudo_mm_remote)
#define PSEUDO_MM_TEMPLATE_INFO		_IOWR(PSEUDO_MM_IOC_MAGIC, 8, struct pseudo_mm_template_info)

#define PSEUDO_MM_MAX_TEMPLATES	4095
#define PSEUDO_MM_MAX_BACKENDS	256
#define PSEUDO_MM_MAX_DAX_PAGES	(1ULL << 24)	/* 64 GiB per DAX backend */
#define PSEUDO_MM_REGION_BITS	12
#define PSEUDO_MM_MAX_REGIONS	(1U << PSEUDO_MM_REGION_BITS)

/* mmap(2) offset, in bytes, of region `index` of template `id` (4 KiB pages). */
#define PSEUDO_MM_MAP_OFFSET(id, index) \
	((((__u64)(id) << PSEUDO_MM_REGION_BITS) | (__u64)(index)) << 12)

#endif /* _UAPI_LINUX_PSEUDO_MM_H */
