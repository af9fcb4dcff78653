/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * /dev/pseudo_mm: memory templates mapped straight from a memory pool.
 *
 * A *backend* is a regular file of the memory pool (a tmpfs region file today), registered
 * by descriptor; the module keeps its own reference, and nobody may write the file while it
 * is registered (as for a running executable: ETXTBSY). A *template* is a list of *regions*,
 * each a page range of a backend. A process maps a region privately with mmap(2) of
 * /dev/pseudo_mm at offset PSEUDO_MM_MAP_OFFSET(template, region): a read fault maps the
 * backend's page itself (one physical page shared by every instance, never copied); a write
 * copies it into the process's own memory (copy-on-write, charged to its memory cgroup).
 *
 * Requests return 0, or -1 with errno: EINVAL (malformed argument), EFAULT (unreadable or
 * unwritable argument), EBADF (not an open descriptor), ENOENT (no such template or
 * backend), EBUSY (still mapped or used), ETXTBSY (the backend has writers), ENOSPC (a
 * table is full), ENOTTY (unknown request). A template cannot change or go while any process maps it.
 */
#ifndef _UAPI_LINUX_PSEUDO_MM_H
#define _UAPI_LINUX_PSEUDO_MM_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define PSEUDO_MM_IOC_MAGIC 0x1c

struct pseudo_mm_backend {
	__s32 fd;	/* in: an open regular file, readable */
	__u32 id;	/* out: backend id, > 0 */
};

struct pseudo_mm_template {
	__u32 flags;	/* in: 0 */
	__u32 id;	/* out: template id, > 0 */
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
};

#define PSEUDO_MM_REGISTER_BACKEND	_IOWR(PSEUDO_MM_IOC_MAGIC, 1, struct pseudo_mm_backend)
#define PSEUDO_MM_UNREGISTER_BACKEND	_IOW(PSEUDO_MM_IOC_MAGIC, 2, __u32)
#define PSEUDO_MM_CREATE_TEMPLATE	_IOWR(PSEUDO_MM_IOC_MAGIC, 3, struct pseudo_mm_template)
#define PSEUDO_MM_ADD_REGION		_IOWR(PSEUDO_MM_IOC_MAGIC, 4, struct pseudo_mm_region)
#define PSEUDO_MM_DELETE_TEMPLATE	_IOW(PSEUDO_MM_IOC_MAGIC, 5, __u32)
#define PSEUDO_MM_STATS			_IOR(PSEUDO_MM_IOC_MAGIC, 6, struct pseudo_mm_stats)

#define PSEUDO_MM_MAX_TEMPLATES	4095
#define PSEUDO_MM_MAX_BACKENDS	256
#define PSEUDO_MM_REGION_BITS	12
#define PSEUDO_MM_MAX_REGIONS	(1U << PSEUDO_MM_REGION_BITS)

/* mmap(2) offset, in bytes, of region `index` of template `id` (4 KiB pages). */
#define PSEUDO_MM_MAP_OFFSET(id, index) \
	((((__u64)(id) << PSEUDO_MM_REGION_BITS) | (__u64)(index)) << 12)

#endif /* _UAPI_LINUX_PSEUDO_MM_H */
