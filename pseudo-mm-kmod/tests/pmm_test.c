// SPDX-License-Identifier: GPL-2.0
/*
 * In-guest tests of /dev/pseudo_mm (run by scripts/kmod-test.sh as root in a qemu guest):
 * argument checking, read sharing (one physical page in every instance), copy-on-write,
 * a template that cannot change or go while mapped, concurrent faults, and nothing left
 * after unmapping (the module's stats). `pmm_test hold TEMPLATE` maps a template and waits,
 * for the unload test; `pmm_test bench` prints fault costs. Prints one "RESULT pass=N
 * fail=M" line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../include/uapi/linux/pseudo_mm.h"

#define PAGE 4096UL
#define FILE_PAGES 16
#define REGION_PGOFF 4
#define REGION_PAGES 8

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

static void *map_region(int dev, uint32_t tpl, uint32_t index, size_t pages, int flags)
{
	return mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, flags, dev,
		    (off_t)PSEUDO_MM_MAP_OFFSET(tpl, index));
}

static int bad_arguments(int dev, int backend_fd)
{
	struct pseudo_mm_backend b = { .fd = 9999 };
	struct pseudo_mm_template t = { .flags = 1 };
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
	CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == 0 && t.id > 0, "create template");
	bad_regions(dev, t.id, b.id);

	r.template_id = t.id;
	r.backend_id = b.id;
	r.pgoff = REGION_PGOFF;
	r.pages = REGION_PAGES;
	CHECK(ioctl(dev, PSEUDO_MM_ADD_REGION, &r) == 0 && r.index == 0, "add region");
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
	t.flags = 0;
	CHECK(ioctl(dev, PSEUDO_MM_REGISTER_BACKEND, &b) == 0, "register again");
	CHECK(ioctl(dev, PSEUDO_MM_CREATE_TEMPLATE, &t) == 0, "create again");
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
