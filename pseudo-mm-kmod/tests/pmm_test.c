// SPDX-License-Identifier: GPL-2.0
/*
 * In-guest tests of /dev/pseudo_mm (run by scripts/kmod-test.sh as root in a qemu guest):
 * argument checking, read sharing (one physical page in every instance), copy-on-write,
 * a template that cannot change or go while mapped, concurrent faults, and nothing left
 * after unmapping (the module's stats). `pmm_test hold TEMPLATE` maps a template and waits,
 * for the unload test; `pmm_test bench` prints fault costs. `pmm_test dax PATH [PAGES]`
 * runs the DAX backend's tests on a device-DAX device (PAGES: its size) or on a new file
 * PATH on a file system mounted with -o dax. Prints one "RESULT pass=N fail=M" line.
 *
 * For the end-to-end restore (scripts/kmod-test.sh): `pmm_test worker DIR` is a process with
 * WORKER_PAGES pages of private anonymous memory, each page with its own bytes, which answers
 * requests (DIR/go) by checking its memory and reporting where its pages are (DIR/out);
 * `pmm_test time LABEL CMD...` runs a command and prints its wall time; `pmm_test stats`
 * prints the module's stats.
 *
 * RDMA (Soft-RoCE in the guest): `pmm_test fill PATH PAGES` writes a pool file for the memory
 * server; `pmm_test rdma ADDR PORT SERVER_PID` runs the remote backend's tests against
 * pmm-memserver serving it, and kills the server in the middle of a process's faults.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../include/uapi/linux/pseudo_mm.h"

#define PAGE 4096UL
#define FILE_PAGES 16
#define REGION_PGOFF 4
#define REGION_PAGES 8
#define DAX_FILE_PAGES 4096
#define DAX_PGOFF 100
#define DAX_REGION_PAGES 1024

static int passed, failed;

#define CHECK(cond, ...)                                        \
	do {                                                    \
		int saved_errno_ = errno;                       \
		if (cond) {                                     \
			passed++;                               \
		} else {                                        \
			failed++;                               \
			printf("FAIL %s:%d: ", __FILE__, __LINE__); \
			printf(__VA_ARGS__);                    \
			printf(" (errno %d)\n", saved_errno_);  \
		}                                               \
	} while (0)

/* The physical frame behind a mapped address (root reads PFNs from pagemap). */
static uint64_t pfn_of(const void *addr)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	off_t off = (off_t)((uintptr_t)addr / PAGE) * 8;

	if (fd < 0 || pread(fd, &entry, 8, off) != 8)
		entry = 0;
	if (fd >= 0)
		close(fd);
	if (!(entry & (1ULL << 63)))
		return 0;
	return entry & ((1ULL << 55) - 1);
}

static struct pseudo_mm_stats stats(int dev)
{
	struct pseudo_mm_stats s;

	memset(&s, 0xff, sizeof(s));
	if (ioctl(dev, PSEUDO_MM_STATS, &s))
		printf("FAIL stats: errno %d\n", errno);
	return s;
}

static struct pseudo_mm_template_info info_of(int dev, uint32_t id)
{
	struct pseudo_mm_template_info info = { .id = id };

	if (ioctl(dev, PSEUDO_MM_TEMPLATE_INFO, &info))
		printf("FAIL info of template %u: errno %d\n", id, errno);
	return info;
}

static void *map_region(int dev, uint32_t tpl, uint32_t index, size_t pages, int flags)
{
	return mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, flags, dev,
		    (off_t)PSEUDO_MM_MAP_OFFSET(tpl, index));
}

/* Creates `n` empty templates (kept until deleted or unloaded): the next template made
 * after them gets id n + 1 on a freshly loaded module. */
static int take_ids(unsigned long n)
{
	struct pseudo_mm_template t = { 0 };
	int dev = open("/dev/pseudo_mm", O_RDWR);

	for (unsigned long i = 0; dev >= 0 && i < n; i++) {
		if (ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t)) {
			printf("FAIL take-ids: errno %d\n", errno);
			return 1;
		}
	}
	printf("took ids up to %u\n", t.id);
	return dev < 0;
}

static int bad_arguments(int dev, int backend_fd)
{
	struct pseudo_mm_backend b = { .fd = 9999 };
	struct pseudo_mm_template t = { .flags = 2 };
	struct pseudo_mm_region r = { 0 };
	uint32_t id = 12345;
	int dir = open("/", O_RDONLY | O_DIRECTORY);

	CHECK(ioctl(dev, _IO(PSEUDO_MM_IOC_MAGIC, 99), 0) == -1 && errno == ENOTTY, "unknown request");
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_BACKEND, &b) == -1 && errno == EBADF, "bad fd");
	b.fd = dir;
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_BACKEND, &b) == -1 && errno == EINVAL, "directory backend");
	close(dir);
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_BACKEND, NULL) == -1 && errno == EFAULT, "NULL argument");
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_BACKEND, (void *)8) == -1 && errno == EFAULT, "bad pointer");
	CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == -1 && errno == EINVAL, "template flags");
	t.flags = PSEUDO_MM_TEMPLATE_AT_ID;
	t.id = 0;
	CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == -1 && errno == EINVAL, "template at id 0");
	t.id = PSEUDO_MM_MAX_TEMPLATES + 1;
	CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == -1 && errno == EINVAL, "template at an id past the last");
	{
		struct pseudo_mm_template_info info = { .id = 777 };

		CHECK(ioctl(dev, PSEUDO_MM_TEMPLATE_INFO, &info) == -1 && errno == ENOENT, "info of a missing template");
		info.flags = 2;
		CHECK(ioctl(dev, PSEUDO_MM_TEMPLATE_INFO, &info) == -1 && errno == EINVAL, "info flags");
		CHECK(ioctl(dev, PSEUDO_MM_TEMPLATE_INFO, NULL) == -1 && errno == EFAULT, "info NULL");
	}
	r.template_id = 777;
	r.backend_id = 1;
	r.pages = 1;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == -1 && errno == ENOENT, "missing template");
	CHECK(ioctl(dev, PSEUDO_MM_DELETE_TEMPLATE, &id) == -1 && errno == ENOENT, "delete missing");
	CHECK(ioctl(dev, PSEUDO_MM_UNREGISTER_BACKEND, &id) == -1 && errno == ENOENT, "unregister missing");
	(void)backend_fd;
	return 0;
}

static int bad_regions(int dev, uint32_t tpl, uint32_t backend)
{
	struct pseudo_mm_region r = { .template_id = tpl, .backend_id = backend };

	r.pages = 0;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == -1 && errno == EINVAL, "zero pages");
	r.pages = FILE_PAGES + 1;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == -1 && errno == EINVAL, "past the backend");
	r.pgoff = UINT64_MAX;
	r.pages = 2;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == -1 && errno == EINVAL, "overflowing range");
	r.pgoff = 0;
	r.pages = 1;
	r.flags = 4;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == -1 && errno == EINVAL, "region flags");
	return 0;
}

/* Child: maps the region, checks the content and that its pages are the parent's frames;
 * writes page 0 and checks that only its copy changed. Exit status = failures. */
static int child_instance(int dev, uint32_t tpl, const uint64_t *parent_pfns)
{
	unsigned char *p = map_region(dev, tpl, 0, REGION_PAGES, MAP_PRIVATE);
	int bad = 0;

	if (p == MAP_FAILED)
		return 100;
	for (int i = 0; i < REGION_PAGES; i++) {
		if (p[i * PAGE] != REGION_PGOFF + i + 1 || p[i * PAGE + PAGE - 1] != REGION_PGOFF + i + 1)
			bad++;
		if (pfn_of(p + i * PAGE) != parent_pfns[i])
			bad++;
	}
	p[0] = 0xee;
	if (p[0] != 0xee || pfn_of(p) == parent_pfns[0] || pfn_of(p) == 0)
		bad++;
	munmap(p, REGION_PAGES * PAGE);
	return bad;
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* ns per page to fault in `pages` pages of a fresh mapping (by reading or writing), best
 * of `rounds`; `map` makes the mapping. */
static double fault_cost(void *(*map)(void *), void *ctx, size_t pages, int write, int rounds)
{
	double best = 1e18;

	for (int r = 0; r < rounds; r++) {
		volatile unsigned char *p = map(ctx);
		unsigned long sum = 0;
		double t0, t1;

		if (p == MAP_FAILED)
			return -1;
		t0 = now_ns();
		for (size_t i = 0; i < pages; i++) {
			if (write)
				p[i * PAGE] = 1;
			else
				sum += p[i * PAGE];
		}
		t1 = now_ns();
		munmap((void *)p, pages * PAGE);
		(void)sum;
		if ((t1 - t0) / pages < best)
			best = (t1 - t0) / pages;
	}
	return best;
}

struct bench_ctx {
	int dev, fd;
	uint32_t tpl;
	size_t pages;
};

static void *map_template(void *c)
{
	struct bench_ctx *b = c;

	return map_region(b->dev, b->tpl, 0, b->pages, MAP_PRIVATE);
}

static void *map_file(void *c)
{
	struct bench_ctx *b = c;

	return mmap(NULL, b->pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, b->fd, 0);
}

/* Fault cost per page, through the module and through a plain private mapping of the same
 * pool file (the kernel's own path, what CRIU's restore uses today). */
static int bench(void)
{
	struct bench_ctx c = { .pages = 4096 };
	struct pseudo_mm_backend b = { 0 };
	struct pseudo_mm_template t = { 0 };
	struct pseudo_mm_region r = { 0 };
	unsigned char page[PAGE];
	int fd;

	c.dev = open("/dev/pseudo_mm", O_RDWR);
	mkdir("/bench", 0700);
	if (c.dev < 0 || mount("tmpfs", "/bench", "tmpfs", 0, "size=64m"))
		return 1;
	fd = open("/bench/region", O_RDWR | O_CREAT | O_TRUNC, 0600);
	memset(page, 7, PAGE);
	for (size_t i = 0; i < c.pages; i++)
		if (write(fd, page, PAGE) != (ssize_t)PAGE)
			return 1;
	close(fd);
	c.fd = open("/bench/region", O_RDONLY);
	b.fd = c.fd;
	if (ioctl(c.dev, PSEUDO_MM_REGISTER_BACKEND, &b) || ioctl(c.dev, PSEUDO_MM_CREATE_TEMPLATE, &t))
		return 1;
	r.template_id = t.id;
	r.backend_id = b.id;
	r.pages = c.pages;
	if (ioctl(c.dev, PSEUDO_MM_ADD_REGION, &r))
		return 1;
	c.tpl = t.id;
	printf("BENCH pages=%zu read_template=%.0f read_file=%.0f write_template=%.0f write_file=%.0f ns/page\n",
	       c.pages, fault_cost(map_template, &c, c.pages, 0, 5), fault_cost(map_file, &c, c.pages, 0, 5),
	       fault_cost(map_template, &c, c.pages, 1, 5), fault_cost(map_file, &c, c.pages, 1, 5));
	return 0;
}

static int hold(const char *tpl_arg)
{
	int dev = open("/dev/pseudo_mm", O_RDWR);
	uint32_t tpl = (uint32_t)strtoul(tpl_arg, NULL, 10);
	volatile unsigned char *p = map_region(dev, tpl, 0, 1, MAP_PRIVATE);

	if (dev < 0 || p == MAP_FAILED)
		return 1;
	(void)p[0];
	close(dev);	/* the mapping alone must keep the module */
	printf("holding\n");
	fflush(stdout);
	pause();
	return 0;
}

/* Page i of a DAX pool holds byte (i * 7 + 3) & 0xff, at its start and its end. */
static unsigned char dax_byte(size_t i)
{
	return (unsigned char)((i * 7 + 3) & 0xff);
}

static int dax_fill(const char *path, size_t pages, int is_dev)
{
	unsigned char *p;
	int fd = is_dev ? open(path, O_RDWR) : open(path, O_RDWR | O_CREAT | O_EXCL, 0600);

	if (fd < 0)
		return -1;
	if (!is_dev && ftruncate(fd, (off_t)(pages * PAGE)))
		return -1;
	p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return -1;
	for (size_t i = 0; i < pages; i++) {
		memset(p + i * PAGE, 0, PAGE);
		p[i * PAGE] = dax_byte(i);
		p[i * PAGE + PAGE - 1] = dax_byte(i);
	}
	msync(p, pages * PAGE, MS_SYNC);
	munmap(p, pages * PAGE);
	return close(fd);
}

struct dax_ctx {
	int dev;
	uint32_t tpl;
	size_t pgoff, pages;
	const uint64_t *frames;	/* the device frames of the region's pages */
};

/* An instance: reads the template's pages as the device's own frames, then writes one and
 * gets a copy of its own that keeps the rest of the page. Returns failures. */
static int dax_instance(const struct dax_ctx *c, int write_first)
{
	unsigned char *p = map_region(c->dev, c->tpl, 0, c->pages, MAP_PRIVATE);
	int bad = 0;

	if (p == MAP_FAILED)
		return 100;
	if (write_first) {
		/* The first touch is a write: the page arrives copied, with the template's bytes. */
		p[PAGE + 1] = 0x77;
		if (p[PAGE] != dax_byte(c->pgoff + 1) || p[2 * PAGE - 1] != dax_byte(c->pgoff + 1) ||
		    p[PAGE + 1] != 0x77 || pfn_of(p + PAGE) == c->frames[1] || pfn_of(p + PAGE) == 0)
			bad++;
	}
	for (size_t i = 0; i < c->pages; i++) {
		if (write_first && i == 1)
			continue;
		if (p[i * PAGE] != dax_byte(c->pgoff + i) || p[i * PAGE + PAGE - 1] != dax_byte(c->pgoff + i))
			bad++;
		if (pfn_of(p + i * PAGE) != c->frames[i])
			bad++;
	}
	p[0] = 0xee;
	if (p[0] != 0xee || p[PAGE - 1] != dax_byte(c->pgoff) || pfn_of(p) == c->frames[0])
		bad++;
	munmap(p, c->pages * PAGE);
	return bad;
}

static void *map_dax_file(void *c)
{
	struct bench_ctx *b = c;

	return mmap(NULL, b->pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, b->fd,
		    (off_t)(DAX_PGOFF * PAGE));
}

static int dax(const char *path, size_t dev_pages)
{
	struct stat st;
	int is_dev = stat(path, &st) == 0 && S_ISCHR(st.st_mode);
	size_t pages = is_dev ? dev_pages : DAX_FILE_PAGES;
	struct pseudo_mm_backend b = { 0 };
	struct pseudo_mm_template t = { 0 };
	struct pseudo_mm_region r = { 0 };
	struct pseudo_mm_stats s, base;
	struct dax_ctx c = { .pgoff = DAX_PGOFF, .pages = DAX_REGION_PAGES };
	uint64_t frames[DAX_REGION_PAGES];
	volatile unsigned char *direct;
	unsigned char *p;
	int fd, status;
	uint32_t id;

	c.frames = frames;
	c.dev = open("/dev/pseudo_mm", O_RDWR);
	CHECK(c.dev >= 0, "open /dev/pseudo_mm");
	CHECK(pages > DAX_PGOFF + DAX_REGION_PAGES, "a DAX pool of %zu pages", pages);
	CHECK(dax_fill(path, pages, is_dev) == 0, "fill %s", path);
	fd = open(path, O_RDONLY);
	CHECK(fd >= 0, "open %s", path);
	if (c.dev < 0 || fd < 0 || failed)
		goto out;

	base = stats(c.dev);	/* what earlier runs left registered */
	b.fd = fd;
	b.pages = is_dev ? 0 : pages + 1;
	CHECK(ioctl(c.dev, PSEUDO_MM_REGISTER_BACKEND, &b) == -1 && errno == EINVAL,
	      is_dev ? "a device without its size" : "more pages than the file has");
	if (is_dev) {
		b.pages = pages + 4096;
		CHECK(ioctl(c.dev, PSEUDO_MM_REGISTER_BACKEND, &b) == -1 && errno == EINVAL,
		      "more pages than the device has");
	}
	b.pages = 0;
	b.flags = 1;
	CHECK(ioctl(c.dev, PSEUDO_MM_REGISTER_BACKEND, &b) == -1 && errno == EINVAL, "backend flags");
	s = stats(c.dev);
	CHECK(s.pinned_pages == base.pinned_pages && s.backends == base.backends,
	      "failed registrations hold nothing");
	b.flags = 0;
	b.pages = is_dev ? pages : 0;
	CHECK(ioctl(c.dev, PSEUDO_MM_REGISTER_BACKEND, &b) == 0 && b.kind == PSEUDO_MM_BACKEND_DAX &&
	      b.pages == pages, "register a DAX backend (kind %u, pages %llu)", b.kind,
	      (unsigned long long)b.pages);
	s = stats(c.dev);
	CHECK(s.pinned_pages == base.pinned_pages + pages, "every page held (%llu)",
	      (unsigned long long)s.pinned_pages);
	if (!is_dev)
		CHECK(open(path, O_RDWR) == -1 && errno == ETXTBSY, "a DAX file cannot be opened for writing");
	CHECK(ioctl(c.dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == 0, "create template");
	r.template_id = t.id;
	r.backend_id = b.id;
	r.pgoff = pages - 1;
	r.pages = 2;
	CHECK(ioctl(c.dev, PSEUDO_MM_ADD_REGION, &r) == -1 && errno == EINVAL, "region past the device");
	r.pgoff = DAX_PGOFF;
	r.pages = DAX_REGION_PAGES;
	CHECK(ioctl(c.dev, PSEUDO_MM_ADD_REGION, &r) == 0, "add region");
	c.tpl = t.id;

	/* The device's own frames, through a shared mapping of it. */
	direct = mmap(NULL, pages * PAGE, PROT_READ, MAP_SHARED, fd, 0);
	CHECK(direct != MAP_FAILED, "map the device shared");
	if (direct == MAP_FAILED)
		goto out;
	for (size_t i = 0; i < DAX_REGION_PAGES; i++) {
		(void)direct[(DAX_PGOFF + i) * PAGE];
		frames[i] = pfn_of((const void *)(direct + (DAX_PGOFF + i) * PAGE));
	}
	CHECK(frames[0] != 0, "device frames visible");

	p = map_region(c.dev, t.id, 0, DAX_REGION_PAGES, MAP_PRIVATE);
	CHECK(p != MAP_FAILED, "map region");
	if (p == MAP_FAILED)
		goto out;
	{
		size_t wrong = 0, other = 0;

		for (size_t i = 0; i < DAX_REGION_PAGES; i++) {
			wrong += p[i * PAGE] != dax_byte(DAX_PGOFF + i);
			other += pfn_of(p + i * PAGE) != frames[i];
		}
		CHECK(wrong == 0, "content of the region (%zu pages wrong)", wrong);
		CHECK(other == 0, "every page is the device's own frame (%zu are not)", other);
	}
	s = stats(c.dev);
	CHECK(s.dax_pages >= DAX_REGION_PAGES && s.around_pages > 0,
	      "device pages mapped, ahead too (dax %llu, around %llu)", (unsigned long long)s.dax_pages,
	      (unsigned long long)s.around_pages);

	/* Instances, concurrently: some read first, some write first. */
	for (int k = 0; k < 6; k++) {
		if (fork() == 0)
			_exit(dax_instance(&c, k % 2));
	}
	for (int k = 0; k < 6; k++)
		CHECK(wait(&status) > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "DAX instance %d (status %d)", k, status);
	{
		size_t changed = 0;

		for (size_t i = 0; i < DAX_REGION_PAGES; i++)
			changed += p[i * PAGE] != dax_byte(DAX_PGOFF + i) || pfn_of(p + i * PAGE) != frames[i] ||
				   direct[(DAX_PGOFF + i) * PAGE] != dax_byte(DAX_PGOFF + i);
		CHECK(changed == 0, "the region and the device unchanged by the instances' writes (%zu pages changed)",
		      changed);
	}
	s = stats(c.dev);
	CHECK(s.write_faults >= 3, "first-touch writes counted (%llu)", (unsigned long long)s.write_faults);
	/* A fork of a mapped instance sees the same frames. */
	if (fork() == 0) {
		int bad = 0;

		for (size_t i = 0; i < DAX_REGION_PAGES; i++)
			bad += pfn_of(p + i * PAGE) != frames[i];
		_exit(bad);
	}
	CHECK(wait(&status) > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, "fork shares frames");

	id = t.id;
	CHECK(ioctl(c.dev, PSEUDO_MM_DELETE_TEMPLATE, &id) == -1 && errno == EBUSY, "delete while mapped");
	id = b.id;
	CHECK(ioctl(c.dev, PSEUDO_MM_UNREGISTER_BACKEND, &id) == -1 && errno == EBUSY, "unregister while used");

	{
		struct bench_ctx bc = { .dev = c.dev, .tpl = t.id, .pages = DAX_REGION_PAGES, .fd = fd };

		if (is_dev)
			printf("BENCH-DAX device pages=%zu read_template=%.0f write_template=%.0f ns/page\n",
			       bc.pages, fault_cost(map_template, &bc, bc.pages, 0, 5),
			       fault_cost(map_template, &bc, bc.pages, 1, 5));
		else
			printf("BENCH-DAX file pages=%zu read_template=%.0f read_file=%.0f write_template=%.0f write_file=%.0f ns/page\n",
			       bc.pages, fault_cost(map_template, &bc, bc.pages, 0, 5),
			       fault_cost(map_dax_file, &bc, bc.pages, 0, 5),
			       fault_cost(map_template, &bc, bc.pages, 1, 5),
			       fault_cost(map_dax_file, &bc, bc.pages, 1, 5));
	}
	munmap(p, DAX_REGION_PAGES * PAGE);
	munmap((void *)direct, pages * PAGE);
	s = stats(c.dev);
	CHECK(s.vmas == 0, "nothing mapped (vmas %llu)", (unsigned long long)s.vmas);
	id = t.id;
	CHECK(ioctl(c.dev, PSEUDO_MM_DELETE_TEMPLATE, &id) == 0, "delete template");
	id = b.id;
	CHECK(ioctl(c.dev, PSEUDO_MM_UNREGISTER_BACKEND, &id) == 0, "unregister backend");
	s = stats(c.dev);
	CHECK(s.pinned_pages == base.pinned_pages && s.backends == base.backends &&
	      s.templates == base.templates && s.regions == base.regions,
	      "nothing held (pinned %llu)", (unsigned long long)s.pinned_pages);
	close(fd);
	if (!is_dev) {
		fd = open(path, O_RDWR);
		CHECK(fd >= 0, "the DAX file is writable again");
		close(fd);
	}
out:
	printf("RESULT pass=%d fail=%d\n", passed, failed);
	return failed ? 1 : 0;
}

#define WORKER_PAGES 16384
#define RDMA_PAGES 4096		/* the file pmm-memserver serves */
#define RDMA_TIMEOUT_MS 2000

static int fill(const char *path, size_t pages)
{
	return dax_fill(path, pages, 0) ? 1 : 0;
}

static int register_remote(int dev, const char *addr, int port, struct pseudo_mm_remote *r)
{
	memset(r, 0, sizeof(*r));
	if (inet_pton(AF_INET, addr, &r->addr) != 1)
		return -1;
	r->port = htons((uint16_t)port);
	r->timeout_ms = RDMA_TIMEOUT_MS;
	return ioctl(dev, PSEUDO_MM_REGISTER_REMOTE, r);
}

/* Reads every page of a mapping (the pattern of dax_fill at `pgoff`); failures. */
static size_t check_pattern(const unsigned char *p, size_t pgoff, size_t pages)
{
	size_t wrong = 0;

	for (size_t i = 0; i < pages; i++)
		wrong += p[i * PAGE] != dax_byte(pgoff + i) || p[i * PAGE + PAGE - 1] != dax_byte(pgoff + i);
	return wrong;
}

static int rdma(const char *addr, int port, pid_t server)
{
	struct pseudo_mm_remote r;
	struct pseudo_mm_template t = { 0 };
	struct pseudo_mm_region reg = { 0 };
	struct pseudo_mm_stats s, base;
	uint64_t frames[64];
	int dev = open("/dev/pseudo_mm", O_RDWR), status, sync[2];
	unsigned char *p, *q;
	double t0, t1;
	uint32_t id;
	pid_t child;

	CHECK(dev >= 0, "open /dev/pseudo_mm");
	if (dev < 0)
		goto out;
	base = stats(dev);
	/* Bad requests, and a server that is not there: refused, within the bound. */
	CHECK(register_remote(dev, addr, 0, &r) == -1 && errno == EINVAL, "port 0");
	r.flags = 1;
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_REMOTE, &r) == -1 && errno == EINVAL, "remote flags");
	r.flags = 0;
	r.timeout_ms = 600000;
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_REMOTE, &r) == -1 && errno == EINVAL, "timeout too long");
	t0 = now_ns();
	CHECK(register_remote(dev, addr, port + 1, &r) == -1 &&
	      (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ETIMEDOUT),
	      "nobody listening");
	t1 = now_ns();
	CHECK((t1 - t0) / 1e6 < 3 * RDMA_TIMEOUT_MS + 2000, "refused within the bound (%.0f ms)", (t1 - t0) / 1e6);
	s = stats(dev);
	CHECK(s.backends == base.backends, "failed registrations hold nothing");

	CHECK(register_remote(dev, addr, port, &r) == 0 && r.pages == RDMA_PAGES,
	      "register the memory server (pages %llu)", (unsigned long long)r.pages);
	CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == 0, "create template");
	reg.template_id = t.id;
	reg.backend_id = r.id;
	reg.pgoff = RDMA_PAGES - 1;
	reg.pages = 2;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &reg) == -1 && errno == EINVAL, "range past the server's");
	reg.pgoff = 0;
	reg.pages = 64;		/* range 0: fetched and checked */
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &reg) == 0 && reg.index == 0, "add range 0");
	reg.pgoff = 64;
	reg.pages = RDMA_PAGES - 64;	/* range 1: read while the server dies */
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &reg) == 0 && reg.index == 1, "add range 1");

	p = map_region(dev, t.id, 0, 64, MAP_PRIVATE);
	CHECK(p != MAP_FAILED, "map range 0");
	if (p == MAP_FAILED)
		goto out;
	t0 = now_ns();
	CHECK(check_pattern(p, 0, 64) == 0, "pages fetched over RDMA have the server's bytes");
	t1 = now_ns();
	for (int i = 0; i < 64; i++)
		frames[i] = pfn_of(p + i * PAGE);
	s = stats(dev);
	/* Sequential reads: 16 pages a round trip (the rest of each batch comes by fault-around). */
	CHECK(s.rdma_fetches - base.rdma_fetches == 4 && s.pinned_pages - base.pinned_pages == 64,
	      "16 pages a fetch, kept (fetches %llu)", (unsigned long long)(s.rdma_fetches - base.rdma_fetches));
	/* Another instance: the same frames, no fetch; a write copies. */
	q = map_region(dev, t.id, 0, 64, MAP_PRIVATE);
	{
		double c0 = now_ns();
		size_t wrong = check_pattern(q, 0, 64), other = 0;
		double c1 = now_ns();

		for (int i = 0; i < 64; i++)
			other += pfn_of(q + i * PAGE) != frames[i];
		CHECK(wrong == 0 && other == 0, "a second instance maps the fetched pages (%zu not)", other);
		printf("BENCH-RDMA fetch=%.0f cached=%.0f ns/page\n", (t1 - t0) / 64, (c1 - c0) / 64);
	}
	q[5 * PAGE] = 0x42;
	CHECK(q[5 * PAGE] == 0x42 && p[5 * PAGE] == dax_byte(5) && pfn_of(q + 5 * PAGE) != frames[5],
	      "a write copies the fetched page");
	s = stats(dev);
	CHECK(s.rdma_fetches - base.rdma_fetches == 4, "no fetch for the second instance");
	munmap(q, 64 * PAGE);

	/* The server dies while a process faults range 1 in: that access gets SIGBUS, bounded. */
	if (pipe(sync))
		goto out;
	child = fork();
	if (child == 0) {
		volatile unsigned char *c = map_region(dev, t.id, 1, RDMA_PAGES - 64, MAP_PRIVATE);
		unsigned long sum = 0;

		if (c == MAP_FAILED)
			_exit(2);
		for (size_t i = 0; i < RDMA_PAGES - 64; i++) {
			sum += c[i * PAGE];
			if (i == 8 && write(sync[1], "x", 1) != 1)
				_exit(3);
		}
		_exit(sum ? 0 : 4);	/* every page read: the server outlived the reads */
	}
	{
		char x;

		CHECK(read(sync[0], &x, 1) == 1, "the reader started");
	}
	kill(server, SIGKILL);
	t0 = now_ns();
	CHECK(waitpid(child, &status, 0) == child, "the reader ends");
	t1 = now_ns();
	CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS,
	      "the access the server cannot serve gets SIGBUS (status %#x)", status);
	CHECK((t1 - t0) / 1e6 < 2 * RDMA_TIMEOUT_MS + 3000, "within the bound (%.0f ms)", (t1 - t0) / 1e6);
	printf("RDMA server killed: reader got SIGBUS after %.0f ms\n", (t1 - t0) / 1e6);
	s = stats(dev);
	CHECK(s.rdma_errors > base.rdma_errors, "the failed fetch is counted");
	/* Pages fetched before stay served; a page that needs the server fails at once. */
	CHECK(check_pattern(p, 0, 64) == 0, "fetched pages still served");
	child = fork();
	if (child == 0) {
		volatile unsigned char *c = map_region(dev, t.id, 1, RDMA_PAGES - 64, MAP_PRIVATE);

		if (c == MAP_FAILED)
			_exit(2);
		(void)c[(RDMA_PAGES - 65) * PAGE];
		_exit(0);
	}
	t0 = now_ns();
	CHECK(waitpid(child, &status, 0) == child && WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS,
	      "a lost server: SIGBUS");
	CHECK((now_ns() - t0) / 1e6 < 1000, "at once (%.0f ms)", (now_ns() - t0) / 1e6);
	munmap(p, 64 * PAGE);
	s = stats(dev);
	CHECK(s.vmas == base.vmas, "nothing mapped");
	id = t.id;
	CHECK(ioctl(dev, PSEUDO_MM_DELETE_TEMPLATE, &id) == 0, "delete template");
	id = r.id;
	CHECK(ioctl(dev, PSEUDO_MM_UNREGISTER_BACKEND, &id) == 0, "unregister the lost server");
	s = stats(dev);
	CHECK(s.backends == base.backends && s.pinned_pages == base.pinned_pages && s.templates == base.templates,
	      "nothing held (pinned %llu)", (unsigned long long)s.pinned_pages);
out:
	printf("RESULT pass=%d fail=%d\n", passed, failed);
	return failed ? 1 : 0;
}

static unsigned char worker_byte(size_t i)
{
	return (unsigned char)((i * 13 + 5) & 0xff);
}

/* Physical ranges of persistent memory (device DAX and fsdax namespaces), from /proc/iomem. */
static size_t pmem_ranges(uint64_t (*ranges)[2], size_t max)
{
	FILE *f = fopen("/proc/iomem", "r");
	char line[256];
	size_t n = 0;

	if (!f)
		return 0;
	while (n < max && fgets(line, sizeof(line), f)) {
		unsigned long long start, end;

		if (!strstr(line, "Persistent Memory") && !strstr(line, "namespace"))
			continue;
		if (sscanf(line, " %llx-%llx", &start, &end) == 2) {
			ranges[n][0] = start / PAGE;
			ranges[n][1] = end / PAGE;
			n++;
		}
	}
	fclose(f);
	return n;
}

static size_t device_pages(const unsigned char *m, size_t pages)
{
	uint64_t ranges[16][2];
	size_t nr = pmem_ranges(ranges, 16), dev = 0;

	for (size_t i = 0; i < pages; i++) {
		uint64_t pfn = pfn_of(m + i * PAGE);

		for (size_t r = 0; r < nr; r++)
			if (pfn >= ranges[r][0] && pfn <= ranges[r][1]) {
				dev++;
				break;
			}
	}
	return dev;
}

static int worker(const char *dir)
{
	char ready[256], go[256], out[256], tmp[256];
	unsigned char *m = mmap(NULL, WORKER_PAGES * PAGE, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned int round = 0;
	FILE *f;

	if (m == MAP_FAILED)
		return 1;
	for (size_t i = 0; i < WORKER_PAGES; i++) {
		m[i * PAGE] = worker_byte(i);
		m[i * PAGE + PAGE - 1] = worker_byte(i) ^ 0xff;
	}
	snprintf(ready, sizeof(ready), "%s/ready", dir);
	snprintf(go, sizeof(go), "%s/go", dir);
	snprintf(out, sizeof(out), "%s/out", dir);
	snprintf(tmp, sizeof(tmp), "%s/out.tmp", dir);
	f = fopen(ready, "w");
	if (!f)
		return 1;
	fprintf(f, "%d\n", getpid());
	fclose(f);
	for (;;) {
		size_t wrong = 0, dev, dev_after;

		usleep(20000);
		if (access(go, F_OK))
			continue;
		unlink(go);
		for (size_t i = 0; i < WORKER_PAGES; i++)
			wrong += m[i * PAGE] != worker_byte(i) || m[i * PAGE + PAGE - 1] != (worker_byte(i) ^ 0xff);
		dev = device_pages(m, WORKER_PAGES);
		/* A write copies that page (and only it) out of the template. */
		m[round * PAGE + 1] = 1;
		dev_after = device_pages(m, WORKER_PAGES);
		f = fopen(tmp, "w");
		if (!f)
			return 1;
		fprintf(f, "pid=%d pages=%d wrong=%zu device=%zu device_after_write=%zu\n", getpid(),
			WORKER_PAGES, wrong, dev, dev_after);
		fclose(f);
		rename(tmp, out);
		round++;
	}
}

static int time_command(const char *label, char **argv)
{
	double t0 = now_ns();
	int status;
	pid_t pid = fork();

	if (pid == 0) {
		execvp(argv[0], argv);
		_exit(127);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid)
		return 1;
	printf("TIME %s %.1f ms (exit %d)\n", label, (now_ns() - t0) / 1e6,
	       WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

/* Runs a command as a child subreaper: processes CRIU restores detached (-d) are reparented
 * here and reaped when killed, so that their pids are free for the next restore. */
static int reap(char **argv)
{
	pid_t child;
	int status, rc = 1;

	prctl(PR_SET_CHILD_SUBREAPER, 1);
	child = fork();
	if (child == 0) {
		execvp(argv[0], argv);
		_exit(127);
	}
	for (;;) {
		pid_t pid = wait(&status);

		if (pid < 0)
			break;
		if (pid == child) {
			rc = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
			break;
		}
	}
	return rc;
}

static int print_stats(void)
{
	int dev = open("/dev/pseudo_mm", O_RDWR);
	struct pseudo_mm_stats s;

	if (dev < 0)
		return 1;
	s = stats(dev);
	printf("STATS templates=%llu backends=%llu regions=%llu vmas=%llu read_faults=%llu write_faults=%llu dax_pages=%llu around_pages=%llu pinned_pages=%llu\n",
	       (unsigned long long)s.templates, (unsigned long long)s.backends,
	       (unsigned long long)s.regions, (unsigned long long)s.vmas,
	       (unsigned long long)s.read_faults, (unsigned long long)s.write_faults,
	       (unsigned long long)s.dax_pages, (unsigned long long)s.around_pages,
	       (unsigned long long)s.pinned_pages);
	return 0;
}

int main(int argc, char **argv)
{
	struct pseudo_mm_backend b = { 0 };
	struct pseudo_mm_template t = { 0 };
	struct pseudo_mm_region r = { 0 };
	struct pseudo_mm_stats s;
	uint64_t pfns[REGION_PAGES];
	unsigned char *p;
	volatile unsigned char *direct;
	int dev, fd, status;

	if (argc == 3 && strcmp(argv[1], "hold") == 0)
		return hold(argv[2]);
	if (argc == 2 && strcmp(argv[1], "bench") == 0)
		return bench();
	if (argc == 3 && strcmp(argv[1], "worker") == 0)
		return worker(argv[2]);
	if (argc >= 4 && strcmp(argv[1], "time") == 0)
		return time_command(argv[2], argv + 3);
	if (argc == 4 && strcmp(argv[1], "fill") == 0)
		return fill(argv[2], strtoul(argv[3], NULL, 10));
	if (argc == 5 && strcmp(argv[1], "rdma") == 0)
		return rdma(argv[2], atoi(argv[3]), (pid_t)atoi(argv[4]));
	if (argc >= 3 && strcmp(argv[1], "reap") == 0)
		return reap(argv + 2);
	if (argc == 2 && strcmp(argv[1], "stats") == 0)
		return print_stats();
	if (argc == 3 && strcmp(argv[1], "take-ids") == 0)
		return take_ids(strtoul(argv[2], NULL, 10));
	if (argc >= 3 && strcmp(argv[1], "dax") == 0)
		return dax(argv[2], argc > 3 ? strtoul(argv[3], NULL, 10) : 0);

	dev = open("/dev/pseudo_mm", O_RDWR);
	CHECK(dev >= 0, "open /dev/pseudo_mm");
	if (dev < 0)
		goto out;
	bad_arguments(dev, -1);

	/* A tmpfs region file as the memory pool: page i holds byte i + 1. */
	mkdir("/pool", 0700);
	CHECK(mount("tmpfs", "/pool", "tmpfs", 0, "size=16m") == 0, "mount tmpfs");
	fd = open("/pool/region", O_RDWR | O_CREAT | O_TRUNC, 0600);
	for (int i = 0; i < FILE_PAGES; i++) {
		unsigned char page[PAGE];

		memset(page, i + 1, PAGE);
		CHECK(write(fd, page, PAGE) == (ssize_t)PAGE, "fill the region file");
	}
	/* A file with writers is no backend; closed, it is, and nobody may write it after. */
	b.fd = fd;
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_BACKEND, &b) == -1 && errno == ETXTBSY,
	      "register a file open for writing");
	close(fd);
	fd = open("/pool/region", O_RDONLY);
	b.fd = fd;
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_BACKEND, &b) == 0 && b.id > 0, "register backend");
	CHECK(open("/pool/region", O_RDWR) == -1 && errno == ETXTBSY, "open for writing refused");
	CHECK(truncate("/pool/region", 0) == -1 && errno == ETXTBSY, "truncate refused");
	t.tag = 0x5eed0000cafe0001ULL;
	CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == 0 && t.id > 0, "create template");
	bad_regions(dev, t.id, b.id);

	r.template_id = t.id;
	r.backend_id = b.id;
	r.pgoff = REGION_PGOFF;
	r.pages = REGION_PAGES;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == 0 && r.index == 0, "add region");
	{
		struct pseudo_mm_template_info info = info_of(dev, t.id);

		CHECK(info.tag == t.tag && info.regions == 1 && info.pages == REGION_PAGES && info.mappings == 0 &&
		      info.backend == b.id && info.reserved == 0,
		      "template info (tag %llx, regions %u, pages %llu, mappings %u, backend %u)",
		      (unsigned long long)info.tag, info.regions, (unsigned long long)info.pages, info.mappings,
		      info.backend);
	}
	/* Made again under an id given: refused while the id is taken; then it is the new one. */
	{
		struct pseudo_mm_template at = { .flags = PSEUDO_MM_TEMPLATE_AT_ID, .id = t.id, .tag = 7 };
		uint32_t id;

		CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &at) == -1 && errno == EEXIST, "template at a taken id");
		at.id = PSEUDO_MM_MAX_TEMPLATES;
		CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &at) == 0 && at.id == PSEUDO_MM_MAX_TEMPLATES,
		      "template at a free id (%u)", at.id);
		CHECK(info_of(dev, at.id).tag == 7 && info_of(dev, at.id).backend == 0, "its info");
		id = at.id;
		CHECK(ioctl(dev, PSEUDO_MM_DELETE_TEMPLATE, &id) == 0, "delete it");
	}
	CHECK(map_region(dev, t.id, 0, REGION_PAGES, MAP_SHARED) == MAP_FAILED && errno == EINVAL,
	      "shared mapping refused");
	CHECK(map_region(dev, t.id, 0, REGION_PAGES + 1, MAP_PRIVATE) == MAP_FAILED && errno == EINVAL,
	      "mapping past the region refused");
	CHECK(map_region(dev, t.id, 1, 1, MAP_PRIVATE) == MAP_FAILED && errno == EINVAL,
	      "missing region refused");

	p = map_region(dev, t.id, 0, REGION_PAGES, MAP_PRIVATE);
	CHECK(p != MAP_FAILED, "map region");
	if (p == MAP_FAILED)
		goto out;
	direct = mmap(NULL, FILE_PAGES * PAGE, PROT_READ, MAP_SHARED, fd, 0);
	for (int i = 0; i < REGION_PAGES; i++) {
		CHECK(p[i * PAGE] == REGION_PGOFF + i + 1, "content of page %d", i);
		pfns[i] = pfn_of(p + i * PAGE);
		(void)direct[(REGION_PGOFF + i) * PAGE];
		CHECK(pfns[i] != 0 && pfns[i] == pfn_of((const void *)(direct + (REGION_PGOFF + i) * PAGE)),
		      "page %d is the pool's own frame", i);
	}
	munmap((void *)direct, FILE_PAGES * PAGE);
	s = stats(dev);
	CHECK(s.around_pages > 0, "fault-around mapped pages ahead");
	CHECK(s.vmas == 1 && s.read_faults + s.around_pages >= REGION_PAGES && s.templates == 1 &&
	      s.backends == 1 &&
	      s.regions == 1, "stats while mapped");

	/* While mapped, the template can neither change nor go, nor its backend. */
	{
		uint32_t id = t.id;

		CHECK(ioctl(dev, PSEUDO_MM_DELETE_TEMPLATE, &id) == -1 && errno == EBUSY, "delete while mapped");
		CHECK(info_of(dev, t.id).mappings == 1, "info counts the mapping");
		CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == -1 && errno == EBUSY, "add while mapped");
		id = b.id;
		CHECK(ioctl(dev, PSEUDO_MM_UNREGISTER_BACKEND, &id) == -1 && errno == EBUSY,
		      "unregister while used");
	}

	/* Other instances: the same frames for reading, their own copy once written. */
	for (int c = 0; c < 4; c++) {
		if (fork() == 0)
			_exit(child_instance(dev, t.id, pfns));
	}
	for (int c = 0; c < 4; c++) {
		CHECK(wait(&status) > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "instance %d (status %d)", c, status);
	}
	for (int i = 0; i < REGION_PAGES; i++)
		CHECK(p[i * PAGE] == REGION_PGOFF + i + 1 && pfn_of(p + i * PAGE) == pfns[i],
		      "page %d unchanged by the instances' writes", i);
	s = stats(dev);
	CHECK(s.vmas == 1, "children's mappings gone (vmas %llu)", (unsigned long long)s.vmas);
	/* One read maps the pages after it too, the pool's frames, read-only: a write copies. */
	{
		volatile unsigned char *q = map_region(dev, t.id, 0, REGION_PAGES, MAP_PRIVATE);

		CHECK(q != MAP_FAILED, "map again");
		if (q != MAP_FAILED) {
			(void)q[0];
			CHECK(pfn_of((const void *)(q + 3 * PAGE)) == pfns[3], "page 3 mapped ahead");
			q[3 * PAGE] = 0x55;
			CHECK(q[3 * PAGE] == 0x55 && pfn_of((const void *)(q + 3 * PAGE)) != pfns[3] &&
			      p[3 * PAGE] == REGION_PGOFF + 3 + 1,
			      "a page mapped ahead is copied on write");
			munmap((void *)q, REGION_PAGES * PAGE);
		}
	}
	CHECK(s.read_faults + s.around_pages >= 5 * REGION_PAGES, "faults counted");

	/* A fork shares the mapping; splitting it keeps one map. */
	CHECK(mprotect(p + PAGE, PAGE, PROT_READ) == 0, "split by mprotect");
	s = stats(dev);
	CHECK(s.vmas == 3, "split mapping counted (vmas %llu)", (unsigned long long)s.vmas);
	CHECK(munmap(p, REGION_PAGES * PAGE) == 0, "unmap");
	s = stats(dev);
	CHECK(s.vmas == 0, "nothing mapped (vmas %llu)", (unsigned long long)s.vmas);

	{
		uint32_t id = t.id;

		CHECK(ioctl(dev, PSEUDO_MM_DELETE_TEMPLATE, &id) == 0, "delete template");
		id = b.id;
		CHECK(ioctl(dev, PSEUDO_MM_UNREGISTER_BACKEND, &id) == 0, "unregister backend");
	}
	s = stats(dev);
	CHECK(s.templates == 0 && s.backends == 0 && s.regions == 0 && s.vmas == 0, "nothing left");
	close(fd);
	CHECK(truncate("/pool/region", PAGE) == 0, "backend writable again");

	/* For the unload test: a template left registered, id printed. */
	fd = open("/pool/region", O_RDONLY);
	b.fd = fd;
	b.pages = 0;
	t.flags = 0;
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_BACKEND, &b) == 0, "register again");
	{
		uint32_t deleted = t.id;
		struct pseudo_mm_template_info gone = { .id = deleted };

		CHECK(ioctl(dev, PSEUDO_MM_TEMPLATE_INFO, &gone) == -1 && errno == ENOENT, "info of a deleted template");
		t.tag = 2;
		CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == 0, "create again");
		CHECK(t.id != deleted, "a deleted template's id is not given again at once (%u)", t.id);
	}
	r.template_id = t.id;
	r.backend_id = b.id;
	r.pgoff = 0;
	r.pages = 1;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == 0, "add again");
	close(fd);
	printf("TEMPLATE %u\n", t.id);
out:
	printf("RESULT pass=%d fail=%d\n", passed, failed);
	return failed ? 1 : 0;
}
