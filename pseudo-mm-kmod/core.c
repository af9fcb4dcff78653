// SPDX-License-Identifier: GPL-2.0
/*
 * pseudo_mm: memory templates mapped straight from a memory pool (see
 * include/uapi/linux/pseudo_mm.h for the interface).
 *
 * A region's mapping is a private mapping of /dev/pseudo_mm whose fault handler hands the
 * kernel the backend's own page: a read fault maps that page (shared by every instance),
 * and the kernel's private-mapping path copies it on the first write. The module never
 * copies a page itself.
 *  - Page-cache backends (tmpfs): the fault returns the cached page, as a file system's
 *    fault handler would.
 *  - DAX backends (device DAX, or a file on a -o dax file system): the device's pages were
 *    looked up and referenced once, when the backend was registered (by mapping it shared
 *    in the registering process and pinning the pages with get_user_pages); a fault
 *    returns the device page (ZONE_DEVICE, with a struct page) as a page-cache fault would,
 *    so it is mapped as an ordinary file page (refcount and rmap) and copied on write.
 *
 * Lifetimes: the tables (backends, templates) and every change to them are under
 * pmm_lock. A backend holds a reference to its file and is pinned by the regions that use
 * it; a template is pinned by its mappings (one struct pmm_map per mmap, shared by the VMAs
 * split or forked from it), so a mapped template can neither change nor go, and a fault
 * reads only what cannot change under it. Open descriptors and mappings of the device pin
 * the module (file_operations.owner), so it cannot be unloaded while anything uses it.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/file.h>
#include <linux/memremap.h>
#include <linux/mman.h>
#include <linux/pfn_t.h>
#include <linux/fs.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pagemap.h>
#include <linux/shmem_fs.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/xarray.h>

#include "include/uapi/linux/pseudo_mm.h"
#include "rdma.h"

struct pmm_backend {
	struct kref ref;
	u32 id;			/* in pmm_backends, from registration on */
	struct file *file;	/* NULL for a remote backend */
	atomic_t regions;	/* regions using it: unregistering is refused while > 0 */
	u32 kind;		/* PSEUDO_MM_BACKEND_* */
	u64 nr_pages;		/* its size, fixed at registration */
	/* DAX: every page, referenced; remote: the pages fetched so far (NULL until then,
	 * published with release semantics); NULL for page cache. */
	struct page **pages;
	u64 held;		/* referenced pages in `pages` */
	struct pmm_rdma *rdma;	/* remote only */
	struct dev_pagemap *pgmaps[8];	/* DAX: the device maps of its pages, referenced */
	unsigned int nr_pgmaps;
	struct mutex fetch_lock;	/* remote: one fetch at a time */
};

struct pmm_region {
	struct pmm_backend *backend;
	pgoff_t pgoff;
	u64 pages;
};

struct pmm_template {
	struct kref ref;
	atomic_t mappings;	/* struct pmm_map of it: changes are refused while > 0 */
	u64 tag;		/* the creator's, reported back: ids are reused after a reload */
	u32 nr_regions;
	struct pmm_region *regions;
};

/* One mmap(2) of a region; its VMAs (after splits and forks) share it. */
struct pmm_map {
	struct kref ref;
	struct pmm_template *tpl;
	const struct pmm_region *region;
	pgoff_t base;		/* vm_pgoff of the mapping's first page */
};

static DEFINE_MUTEX(pmm_lock);
static DEFINE_XARRAY_ALLOC1(pmm_backends);
static DEFINE_XARRAY_ALLOC1(pmm_templates);
static u32 pmm_next_template = 1;	/* round-robin ids, under pmm_lock */

static atomic64_t stat_templates, stat_backends, stat_regions, stat_vmas;
static atomic64_t stat_read_faults, stat_write_faults, stat_bad_faults, stat_around_pages;
static atomic64_t stat_dax_pages, stat_pinned_pages, stat_rdma_fetches, stat_rdma_errors;

/* Pages looked up per get_user_pages call while registering a DAX backend. */
#define PMM_PIN_BATCH 512

/*
 * Pages mapped ahead of a read fault (the faulting one included), as the kernel's
 * fault-around does for file mappings: one trap then maps up to this many pages that are
 * in the backend's page cache already.
 */
#define PMM_FAULT_AROUND 16

static void release_pgmaps(struct pmm_backend *b)
{
	while (b->nr_pgmaps)
		put_dev_pagemap(b->pgmaps[--b->nr_pgmaps]);
}

static void backend_release(struct kref *ref)
{
	struct pmm_backend *b = container_of(ref, struct pmm_backend, ref);
	u64 i;

	if (b->rdma)
		pmm_rdma_destroy(b->rdma);
	if (b->pages) {
		for (i = 0; i < b->nr_pages; i++) {
			if (b->pages[i])
				put_page(b->pages[i]);
			if (!(i % 4096))
				cond_resched();
		}
		atomic64_sub(b->held, &stat_pinned_pages);
		kvfree(b->pages);
	}
	release_pgmaps(b);
	if (b->file) {
		allow_write_access(b->file);
		fput(b->file);
	}
	kfree(b);
	atomic64_dec(&stat_backends);
}

static void template_release(struct kref *ref)
{
	struct pmm_template *t = container_of(ref, struct pmm_template, ref);
	u32 i;

	for (i = 0; i < t->nr_regions; i++) {
		atomic_dec(&t->regions[i].backend->regions);
		kref_put(&t->regions[i].backend->ref, backend_release);
		atomic64_dec(&stat_regions);
	}
	kvfree(t->regions);
	kfree(t);
	atomic64_dec(&stat_templates);
}

static void map_release(struct kref *ref)
{
	struct pmm_map *m = container_of(ref, struct pmm_map, ref);

	atomic_dec(&m->tpl->mappings);
	kref_put(&m->tpl->ref, template_release);
	kfree(m);
}

/* Only page-cache files the module can read a page of: tmpfs, or a file system with
 * ->read_folio. */
static bool backend_readable(struct file *file)
{
	struct address_space *mapping = file->f_mapping;

	if (!S_ISREG(file_inode(file)->i_mode) || !(file->f_mode & FMODE_READ))
		return false;
	/*
	 * Not network or FUSE file systems: they invalidate cached pages on their own (a
	 * server-side change), including pages mapped here, which rmap cannot see.
	 */
	if (shmem_mapping(mapping))
		return true;
	return (file_inode(file)->i_sb->s_type->fs_flags & FS_REQUIRES_DEV) && mapping->a_ops &&
	       mapping->a_ops->read_folio;
}

/* Publishes a new backend; on failure it is released. */
static long add_backend(struct pmm_backend *b, u32 *id)
{
	int err;

	mutex_lock(&pmm_lock);
	err = xa_alloc(&pmm_backends, id, b, XA_LIMIT(1, PSEUDO_MM_MAX_BACKENDS), GFP_KERNEL);
	if (!err)
		b->id = *id;
	mutex_unlock(&pmm_lock);
	if (err) {
		kref_put(&b->ref, backend_release);
		return err == -EBUSY ? -ENOSPC : err;
	}
	return 0;
}

/* Takes back a backend just published, unless another thread unregistered it meanwhile. */
static void remove_backend(struct pmm_backend *b, u32 id)
{
	bool ours;

	mutex_lock(&pmm_lock);
	ours = xa_cmpxchg(&pmm_backends, id, b, NULL, 0) == b;
	mutex_unlock(&pmm_lock);
	if (ours)
		kref_put(&b->ref, backend_release);
}

static bool backend_is_dax(struct file *file)
{
	struct inode *inode = file_inode(file);

	if (!(file->f_mode & FMODE_READ) || !(S_ISREG(inode->i_mode) || S_ISCHR(inode->i_mode)))
		return false;
	return IS_DAX(inode) || IS_DAX(file->f_mapping->host);
}

/*
 * Looks up and references every page of a DAX backend: maps it shared and read-only in the
 * registering process for the time of the lookup, as a user of the device would, so that
 * the device's own mmap decides what is there. Every page must be device memory
 * (ZONE_DEVICE) or, for a hole of a sparse file, the shared zero page: anything else (the
 * caller's memory after a racing munmap and mmap in that range) fails the registration.
 */

/*
 * Checks a looked-up page and keeps what the backend needs of it: a device page of order 0
 * (a compound device page would be mapped by PMD by the fault path, and a 1 GiB one's
 * refcount would overflow with instances), with a reference on its dev_pagemap so that the
 * device cannot be unbound or reconfigured under a mapping; or the zero page of a hole.
 */
static int keep_dax_page(struct pmm_backend *b, u64 i)
{
	struct page *page = b->pages[i];
	struct dev_pagemap *pgmap;
	unsigned int k;

	if (is_zero_pfn(page_to_pfn(page)))
		return 0;
	if (!is_zone_device_page(page) || PageCompound(page))
		return -EINVAL;
	for (k = 0; k < b->nr_pgmaps; k++)
		if (page->pgmap == b->pgmaps[k])
			return 0;
	if (b->nr_pgmaps == ARRAY_SIZE(b->pgmaps))
		return -EINVAL;
	pgmap = get_dev_pagemap(page_to_pfn(page), NULL);
	if (!pgmap)
		return -EINVAL;
	b->pgmaps[b->nr_pgmaps++] = pgmap;
	return 0;
}

/*
 * Looks up and references every page of a DAX backend: maps it shared and read-only in the
 * registering process for the time of the lookup, as a user of the device would, so that
 * the device's own mmap decides what is there. The lookup holds mmap_lock and checks that
 * the range is still the backend's mapping, so a racing munmap and mmap by another thread
 * cannot slip other pages in. Every page must be device memory of order 0 or the zero page
 * of a hole.
 */
static int backend_pin_dax(struct pmm_backend *b)
{
	unsigned long len = b->nr_pages << PAGE_SHIFT;
	struct mm_struct *mm = current->mm;
	struct vm_area_struct *vma;
	unsigned long addr;
	u64 done = 0;
	int err = 0;

	if (!mm)
		return -EINVAL;
	b->pages = kvcalloc(b->nr_pages, sizeof(*b->pages), GFP_KERNEL);
	if (!b->pages)
		return -ENOMEM;
	addr = vm_mmap(b->file, 0, len, PROT_READ, MAP_SHARED, 0);
	if (IS_ERR_VALUE(addr)) {
		err = (long)addr == -ENOMEM ? -ENOMEM : -EINVAL;
		goto out_free;
	}
	/*
	 * Page by page: a hole of an fsdax file is then the small zero page (a PMD-mapped one
	 * would be the huge zero page, which a module cannot tell apart).
	 */
	mmap_write_lock(mm);
	vma = vma_lookup(mm, addr);
	if (!vma || vma->vm_file != b->file || vma->vm_start != addr || vma->vm_end != addr + len)
		err = -EINVAL;
	else
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
		vm_flags_set(vma, VM_NOHUGEPAGE);
#else
		vma->vm_flags |= VM_NOHUGEPAGE;
#endif
	mmap_write_downgrade(mm);
	while (!err && done < b->nr_pages) {
		unsigned long n = min_t(u64, b->nr_pages - done, PMM_PIN_BATCH);
		long got;
		int i;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
		got = get_user_pages(addr + (done << PAGE_SHIFT), n, 0, b->pages + done);
#else
		got = get_user_pages(addr + (done << PAGE_SHIFT), n, 0, b->pages + done, NULL);
#endif
		if (got <= 0) {
			/* Past the device's end, or a page it cannot give: the size is wrong. */
			err = got == -ENOMEM ? -ENOMEM : -EINVAL;
			break;
		}
		for (i = 0; i < got; i++)
			if (!err)
				err = keep_dax_page(b, done + i);
		done += got;
		if (!err && fatal_signal_pending(current))
			err = -EINTR;
	}
	mmap_read_unlock(mm);
	vm_munmap(addr, len);
	if (!err) {
		b->held = b->nr_pages;
		atomic64_add(b->held, &stat_pinned_pages);
		return 0;
	}
	while (done > 0)
		put_page(b->pages[--done]);
	release_pgmaps(b);
out_free:
	kvfree(b->pages);
	b->pages = NULL;
	return err;
}

static int backend_open(struct pmm_backend *b, u64 pages)
{
	u64 size;

	if (backend_is_dax(b->file)) {
		b->kind = PSEUDO_MM_BACKEND_DAX;
		/* A device has no file size (0): the caller gives it. A file's is the limit. */
		size = S_ISREG(file_inode(b->file)->i_mode) ?
			i_size_read(file_inode(b->file)) >> PAGE_SHIFT : PSEUDO_MM_MAX_DAX_PAGES;
		b->nr_pages = pages ? pages : size;
		if (!b->nr_pages || b->nr_pages > size || b->nr_pages > PSEUDO_MM_MAX_DAX_PAGES)
			return -EINVAL;
		return 0;
	}
	if (!backend_readable(b->file))
		return -EINVAL;
	b->kind = PSEUDO_MM_BACKEND_PAGECACHE;
	size = DIV_ROUND_UP_ULL(i_size_read(file_inode(b->file)), PAGE_SIZE);
	b->nr_pages = pages ? pages : size;
	return b->nr_pages && b->nr_pages <= size ? 0 : -EINVAL;
}

static long register_backend(void __user *arg)
{
	struct pseudo_mm_backend req;
	struct pmm_backend *b;
	u32 id;
	int err;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags)
		return -EINVAL;
	b = kzalloc(sizeof(*b), GFP_KERNEL);
	if (!b)
		return -ENOMEM;
	b->file = fget(req.fd);
	if (!b->file) {
		err = -EBADF;
		goto out_free;
	}
	err = backend_open(b, req.pages);
	if (err)
		goto out_put;
	/*
	 * A mapped page must stay the backend's: a page truncated away while mapped here would
	 * be reported as bad page cache, and a write would change every instance. So nobody may
	 * write the file while it is registered, as for a running executable: registering
	 * fails with ETXTBSY while it has writers, and opening it for writing fails after.
	 */
	err = deny_write_access(b->file);
	if (err)
		goto out_put;
	/* Pages are looked up once nobody can write or truncate the backend any more. */
	if (b->kind == PSEUDO_MM_BACKEND_DAX) {
		err = backend_pin_dax(b);
		if (err)
			goto out_allow;
	}
	kref_init(&b->ref);
	atomic_set(&b->regions, 0);
	atomic64_inc(&stat_backends);

	err = add_backend(b, &id);
	if (err)
		return err;
	req.id = id;
	req.kind = b->kind;
	req.pages = b->nr_pages;
	if (copy_to_user(arg, &req, sizeof(req))) {
		remove_backend(b, id);
		return -EFAULT;
	}
	return 0;

out_allow:
	allow_write_access(b->file);
out_put:
	fput(b->file);
out_free:
	kfree(b);
	return err;
}

#define PMM_RDMA_DEFAULT_TIMEOUT_MS 5000
#define PMM_RDMA_MAX_TIMEOUT_MS 60000

static long register_remote(void __user *arg)
{
	struct pseudo_mm_remote req;
	struct pmm_backend *b;
	unsigned int timeout;
	u64 pages = 0;
	u32 id;
	long err;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags || !req.addr || !req.port || req.timeout_ms > PMM_RDMA_MAX_TIMEOUT_MS)
		return -EINVAL;
	timeout = req.timeout_ms ? req.timeout_ms : PMM_RDMA_DEFAULT_TIMEOUT_MS;
	b = kzalloc(sizeof(*b), GFP_KERNEL);
	if (!b)
		return -ENOMEM;
	b->rdma = pmm_rdma_connect(req.addr, req.port, timeout, &pages);
	if (IS_ERR(b->rdma)) {
		err = PTR_ERR(b->rdma);
		kfree(b);
		return err;
	}
	kref_init(&b->ref);
	atomic_set(&b->regions, 0);
	mutex_init(&b->fetch_lock);
	b->kind = PSEUDO_MM_BACKEND_RDMA;
	b->nr_pages = pages;
	atomic64_inc(&stat_backends);
	if (pages > PSEUDO_MM_MAX_DAX_PAGES) {
		kref_put(&b->ref, backend_release);
		return -EINVAL;
	}
	b->pages = kvcalloc(pages, sizeof(*b->pages), GFP_KERNEL);
	if (!b->pages) {
		kref_put(&b->ref, backend_release);
		return -ENOMEM;
	}
	err = add_backend(b, &id);
	if (err)
		return err;
	req.id = id;
	req.pages = pages;
	if (copy_to_user(arg, &req, sizeof(req))) {
		remove_backend(b, id);
		return -EFAULT;
	}
	return 0;
}

/*
 * Takes entry *arg (a u32 id) out of `xa` unless it is in use (the atomic_t at `users` in
 * it is > 0); the caller puts what it returns.
 */
static void *take_unused(struct xarray *xa, void __user *arg, size_t users)
{
	void *entry;
	u32 id;

	if (get_user(id, (u32 __user *)arg))
		return ERR_PTR(-EFAULT);
	mutex_lock(&pmm_lock);
	entry = xa_load(xa, id);
	if (!entry)
		entry = ERR_PTR(-ENOENT);
	else if (atomic_read((atomic_t *)((char *)entry + users)) > 0)
		entry = ERR_PTR(-EBUSY);
	else
		xa_erase(xa, id);
	mutex_unlock(&pmm_lock);
	return entry;
}

static long unregister_backend(void __user *arg)
{
	struct pmm_backend *b = take_unused(&pmm_backends, arg, offsetof(struct pmm_backend, regions));

	if (IS_ERR(b))
		return PTR_ERR(b);
	kref_put(&b->ref, backend_release);
	return 0;
}

static long create_template(void __user *arg)
{
	struct pseudo_mm_template req;
	struct pmm_template *t;
	u32 id;
	int err;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags & ~PSEUDO_MM_TEMPLATE_AT_ID)
		return -EINVAL;
	if ((req.flags & PSEUDO_MM_TEMPLATE_AT_ID) && (!req.id || req.id > PSEUDO_MM_MAX_TEMPLATES))
		return -EINVAL;
	t = kzalloc(sizeof(*t), GFP_KERNEL);
	if (!t)
		return -ENOMEM;
	kref_init(&t->ref);
	atomic_set(&t->mappings, 0);
	t->tag = req.tag;
	atomic64_inc(&stat_templates);
	mutex_lock(&pmm_lock);
	if (req.flags & PSEUDO_MM_TEMPLATE_AT_ID) {
		id = req.id;
		err = xa_insert(&pmm_templates, id, t, GFP_KERNEL);
		if (err == -EBUSY)
			err = -EEXIST;
	} else {
		/* Round-robin, so that an id a caller still holds is not soon another template's. */
		err = xa_alloc_cyclic(&pmm_templates, &id, t, XA_LIMIT(1, PSEUDO_MM_MAX_TEMPLATES),
				      &pmm_next_template, GFP_KERNEL);
		if (err == -EBUSY)
			err = -ENOSPC;
	}
	mutex_unlock(&pmm_lock);
	if (err < 0) {
		kref_put(&t->ref, template_release);
		return err;
	}
	req.id = id;
	if (copy_to_user(arg, &req, sizeof(req))) {
		/* Another thread may have deleted it (and the id gone to another) meanwhile. */
		mutex_lock(&pmm_lock);
		if (xa_cmpxchg(&pmm_templates, id, t, NULL, 0) == t)
			kref_put(&t->ref, template_release);
		mutex_unlock(&pmm_lock);
		return -EFAULT;
	}
	return 0;
}

static long add_region(void __user *arg)
{
	struct pseudo_mm_region req;
	struct pmm_template *t;
	struct pmm_backend *b;
	struct pmm_region *regions;
	u64 end;
	long ret = 0;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags || !req.pages || check_add_overflow(req.pgoff, req.pages, &end))
		return -EINVAL;
	mutex_lock(&pmm_lock);
	t = xa_load(&pmm_templates, req.template_id);
	b = xa_load(&pmm_backends, req.backend_id);
	if (!t || !b) {
		ret = -ENOENT;
		goto out;
	}
	if (end > b->nr_pages) {
		ret = -EINVAL;
		goto out;
	}
	if (atomic_read(&t->mappings) > 0) {
		ret = -EBUSY;
		goto out;
	}
	if (t->nr_regions >= PSEUDO_MM_MAX_REGIONS) {
		ret = -ENOSPC;
		goto out;
	}
	regions = kvmalloc_array(t->nr_regions + 1, sizeof(*regions), GFP_KERNEL);
	if (!regions) {
		ret = -ENOMEM;
		goto out;
	}
	if (t->nr_regions)
		memcpy(regions, t->regions, t->nr_regions * sizeof(*regions));
	kref_get(&b->ref);
	atomic_inc(&b->regions);
	regions[t->nr_regions] = (struct pmm_region){
		.backend = b,
		.pgoff = req.pgoff,
		.pages = req.pages,
	};
	kvfree(t->regions);
	t->regions = regions;
	req.index = t->nr_regions++;
	atomic64_inc(&stat_regions);
	mutex_unlock(&pmm_lock);
	/*
	 * Written back without the lock: a fault on `arg` takes mmap_lock, which mmap(2) of the
	 * device holds while it takes pmm_lock. On EFAULT the range stays added (at index
	 * nr_regions - 1), as the template is whole either way.
	 */
	return copy_to_user(arg, &req, sizeof(req)) ? -EFAULT : 0;
out:
	mutex_unlock(&pmm_lock);
	return ret;
}

static long delete_template(void __user *arg)
{
	struct pmm_template *t = take_unused(&pmm_templates, arg,
					     offsetof(struct pmm_template, mappings));

	if (IS_ERR(t))
		return PTR_ERR(t);
	kref_put(&t->ref, template_release);
	return 0;
}

static long template_info(void __user *arg)
{
	struct pseudo_mm_template_info req;
	struct pmm_template *t;
	u32 i;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags)
		return -EINVAL;
	mutex_lock(&pmm_lock);
	t = xa_load(&pmm_templates, req.id);
	if (!t) {
		mutex_unlock(&pmm_lock);
		return -ENOENT;
	}
	req.tag = t->tag;
	req.regions = t->nr_regions;
	req.pages = 0;
	for (i = 0; i < t->nr_regions; i++)
		req.pages += t->regions[i].pages;
	req.mappings = atomic_read(&t->mappings);
	req.backend = t->nr_regions ? t->regions[0].backend->id : 0;
	req.reserved = 0;
	mutex_unlock(&pmm_lock);
	return copy_to_user(arg, &req, sizeof(req)) ? -EFAULT : 0;
}

static long get_stats(void __user *arg)
{
	struct pseudo_mm_stats s = {
		.templates = atomic64_read(&stat_templates),
		.backends = atomic64_read(&stat_backends),
		.regions = atomic64_read(&stat_regions),
		.vmas = atomic64_read(&stat_vmas),
		.read_faults = atomic64_read(&stat_read_faults),
		.write_faults = atomic64_read(&stat_write_faults),
		.bad_faults = atomic64_read(&stat_bad_faults),
		.around_pages = atomic64_read(&stat_around_pages),
		.dax_pages = atomic64_read(&stat_dax_pages),
		.pinned_pages = atomic64_read(&stat_pinned_pages),
		.rdma_fetches = atomic64_read(&stat_rdma_fetches),
		.rdma_errors = atomic64_read(&stat_rdma_errors),
	};

	return copy_to_user(arg, &s, sizeof(s)) ? -EFAULT : 0;
}

static long pmm_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case PSEUDO_MM_REGISTER_BACKEND:
		return register_backend(uarg);
	case PSEUDO_MM_UNREGISTER_BACKEND:
		return unregister_backend(uarg);
	case PSEUDO_MM_CREATE_TEMPLATE:
		return create_template(uarg);
	case PSEUDO_MM_ADD_REGION:
		return add_region(uarg);
	case PSEUDO_MM_DELETE_TEMPLATE:
		return delete_template(uarg);
	case PSEUDO_MM_STATS:
		return get_stats(uarg);
	case PSEUDO_MM_REGISTER_REMOTE:
		return register_remote(uarg);
	case PSEUDO_MM_TEMPLATE_INFO:
		return template_info(uarg);
	default:
		return -ENOTTY;
	}
}

static void pmm_vm_open(struct vm_area_struct *vma)
{
	struct pmm_map *m = vma->vm_private_data;

	kref_get(&m->ref);
	atomic64_inc(&stat_vmas);
}

static void pmm_vm_close(struct vm_area_struct *vma)
{
	struct pmm_map *m = vma->vm_private_data;

	atomic64_dec(&stat_vmas);
	kref_put(&m->ref, map_release);
}

/*
 * A backend's page at `index`, referenced, or NULL: from the page cache (read in if need be,
 * unless `cached_only`), or a DAX backend's page, which is always there.
 */
/*
 * A remote backend's page: fetched at its first use (one at a time per backend, so that
 * every instance gets the one copy), then kept. NULL if the server cannot give it.
 */
static struct page *remote_page(struct pmm_backend *b, pgoff_t index, bool cached_only)
{
	struct page *page = smp_load_acquire(&b->pages[index]);
	struct page *batch[PMM_RDMA_BATCH];
	unsigned int n, i;
	int err;

	if (page || cached_only) {
		if (page)
			get_page(page);
		return page;
	}
	mutex_lock(&b->fetch_lock);
	page = b->pages[index];
	if (page)
		goto out;
	/* This page and the ones after it that are not here yet, in one round trip. */
	for (n = 0; n < PMM_RDMA_BATCH && index + n < b->nr_pages && !b->pages[index + n]; n++) {
		batch[n] = alloc_page(GFP_KERNEL);
		if (!batch[n])
			break;
	}
	if (!n)
		goto out;
	atomic64_inc(&stat_rdma_fetches);
	err = pmm_rdma_fetch(b->rdma, index, batch, n);
	if (err) {
		atomic64_inc(&stat_rdma_errors);
		/* -EINPROGRESS: the device may still write them; they are left to it. */
		for (i = 0; i < n && err != -EINPROGRESS; i++)
			__free_page(batch[i]);
		goto out;
	}
	b->held += n;
	atomic64_add(n, &stat_pinned_pages);
	for (i = 0; i < n; i++)
		smp_store_release(&b->pages[index + i], batch[i]);
	page = batch[0];
out:
	if (page)
		get_page(page);
	mutex_unlock(&b->fetch_lock);
	return page;
}

static struct page *backend_page(struct pmm_backend *b, pgoff_t index, bool cached_only)
{
	struct address_space *mapping;
	struct page *page;

	if (b->rdma)
		return remote_page(b, index, cached_only);
	mapping = b->file->f_mapping;
	if (b->pages) {
		get_page(b->pages[index]);
		return b->pages[index];
	}
	if (cached_only) {
		page = find_get_page(mapping, index);
		if (page && (!PageUptodate(page) || PageHWPoison(page))) {
			put_page(page);
			page = NULL;
		}
		return page;
	}
	if (shmem_mapping(mapping))
		page = shmem_read_mapping_page(mapping, index);
	else
		page = read_mapping_page(mapping, index, b->file);
	return IS_ERR(page) ? NULL : page;
}

static bool pmm_is_zero_page(struct page *page)
{
	return is_zero_pfn(page_to_pfn(page));
}

static void count_mapped(const struct pmm_backend *b)
{
	if (b->pages)
		atomic64_inc(&stat_dax_pages);
}

/*
 * Maps the pages after a read fault's that the backend has at hand (in its page cache, or
 * on its device; no I/O, no allocation of pages): read-only, as the fault's own page, so a
 * write still copies. A page already mapped there is left alone (-EBUSY). Runs in the fault
 * handler, where sleeping is allowed (page-table allocation), unlike ->map_pages, which
 * 6.5+ calls under RCU.
 */
static void pmm_fault_around(struct vm_fault *vmf, const struct pmm_map *m, pgoff_t rel)
{
	struct vm_area_struct *vma = vmf->vma;
	const struct pmm_region *r = m->region;
	unsigned long addr = vmf->address & PAGE_MASK;
	unsigned int i;

	for (i = 1; i < PMM_FAULT_AROUND; i++) {
		unsigned long a = addr + i * PAGE_SIZE;
		struct page *page;

		if (a >= vma->vm_end || rel + i >= r->pages)
			break;
		page = backend_page(r->backend, r->pgoff + rel + i, true);
		if (!page)
			continue;
		/* A hole of a sparse DAX file: left to its own fault (the zero page's PTE). */
		if (!pmm_is_zero_page(page) && !PageAnon(page) && !vm_insert_page(vma, a, page)) {
			atomic64_inc(&stat_around_pages);
			count_mapped(r->backend);
		}
		put_page(page);
	}
}

/*
 * A read maps the backend's page here, as an order-0 PTE (vm_insert_page: an ordinary page
 * mapping with its reference and rmap, so smaps, pagemap and CRIU see a file page), not
 * through the fault path, which maps a huge page of the backend (a tmpfs THP) by PMD. A
 * first touch by a write (vmf->cow_page) hands the page to the kernel, which copies it
 * (do_cow_fault; with copy_mc from 6.8 on, so that a poisoned PMem line gives SIGBUS). A
 * hole's zero page is mapped as the kernel maps it, a special PTE, whatever the access: a
 * write then copies it in wp_page_copy without locking the zero page.
 */
static vm_fault_t pmm_fault(struct vm_fault *vmf)
{
	struct pmm_map *m = vmf->vma->vm_private_data;
	const struct pmm_region *r = m->region;
	pgoff_t rel = vmf->pgoff - m->base;
	struct page *page;
	int err;

	if (rel >= r->pages) {
		atomic64_inc(&stat_bad_faults);
		return VM_FAULT_SIGBUS;
	}
	page = backend_page(r->backend, r->pgoff + rel, false);
	if (!page) {
		atomic64_inc(&stat_bad_faults);
		return VM_FAULT_SIGBUS;
	}
	/* An fsdax page whose extent a reflink shares looks anonymous: not a file page to map. */
	if (PageAnon(page)) {
		put_page(page);
		atomic64_inc(&stat_bad_faults);
		return VM_FAULT_SIGBUS;
	}
	if (pmm_is_zero_page(page)) {
		put_page(page);
		atomic64_inc(&stat_read_faults);
		return vmf_insert_mixed(vmf->vma, vmf->address & PAGE_MASK,
					pfn_to_pfn_t(my_zero_pfn(vmf->address)));
	}
	if (vmf->cow_page) {
		/* The reference goes to the fault path, which copies the page and drops it. */
		vmf->page = page;
		atomic64_inc(&stat_write_faults);
		return 0;
	}
	err = vm_insert_page(vmf->vma, vmf->address & PAGE_MASK, page);
	put_page(page);
	if (err && err != -EBUSY) {	/* -EBUSY: another thread mapped it first */
		atomic64_inc(&stat_bad_faults);
		return err == -ENOMEM ? VM_FAULT_OOM : VM_FAULT_SIGBUS;
	}
	atomic64_inc(&stat_read_faults);
	count_mapped(r->backend);
	pmm_fault_around(vmf, m, rel);
	return VM_FAULT_NOPAGE;
}

static const struct vm_operations_struct pmm_vm_ops = {
	.open = pmm_vm_open,
	.close = pmm_vm_close,
	.fault = pmm_fault,
};

static int pmm_mmap(struct file *file, struct vm_area_struct *vma)
{
	u64 id = vma->vm_pgoff >> PSEUDO_MM_REGION_BITS;
	u32 index = vma->vm_pgoff & (PSEUDO_MM_MAX_REGIONS - 1);
	struct pmm_template *t;
	struct pmm_map *m;

	/* Writes must copy: a shared mapping would write into the template. */
	if (vma->vm_flags & (VM_SHARED | VM_MAYSHARE))
		return -EINVAL;
	if (id == 0 || id > PSEUDO_MM_MAX_TEMPLATES)
		return -EINVAL;
	m = kzalloc(sizeof(*m), GFP_KERNEL);
	if (!m)
		return -ENOMEM;
	mutex_lock(&pmm_lock);
	t = xa_load(&pmm_templates, (unsigned long)id);
	if (!t || index >= t->nr_regions || vma_pages(vma) > t->regions[index].pages) {
		mutex_unlock(&pmm_lock);
		kfree(m);
		return -EINVAL;
	}
	kref_init(&m->ref);
	kref_get(&t->ref);
	atomic_inc(&t->mappings);
	m->tpl = t;
	m->region = &t->regions[index];
	m->base = vma->vm_pgoff;
	mutex_unlock(&pmm_lock);

	vma->vm_private_data = m;
	vma->vm_ops = &pmm_vm_ops;
	/*
	 * VM_MIXEDMAP: faults insert pages with vm_insert_page(). They are ordinary pages, so
	 * the kernel still treats them as such (rmap, copy-on-write, fork). VM_NOHUGEPAGE: no
	 * huge-page path for these mappings (6.12 checks it before mapping by PMD).
	 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_DONTEXPAND | VM_MIXEDMAP | VM_NOHUGEPAGE);
#else
	vma->vm_flags |= VM_DONTEXPAND | VM_MIXEDMAP | VM_NOHUGEPAGE;
#endif
	atomic64_inc(&stat_vmas);
	return 0;
}

static const struct file_operations pmm_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = pmm_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = pmm_mmap,
};

static struct miscdevice pmm_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "pseudo_mm",
	.fops = &pmm_fops,
	.mode = 0600,
};

static int __init pmm_init(void)
{
	return misc_register(&pmm_dev);
}

static void __exit pmm_exit(void)
{
	struct pmm_template *t;
	struct pmm_backend *b;
	unsigned long id;

	misc_deregister(&pmm_dev);
	/* Nothing maps or opens the device any more: what the tables hold goes. */
	xa_for_each(&pmm_templates, id, t)
		kref_put(&t->ref, template_release);
	xa_destroy(&pmm_templates);
	xa_for_each(&pmm_backends, id, b)
		kref_put(&b->ref, backend_release);
	xa_destroy(&pmm_backends);
}

module_init(pmm_init);
module_exit(pmm_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Memory templates mapped straight from a memory pool");
