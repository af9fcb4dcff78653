/* The pod's placeholder process: PID 1 of a pod's namespaces, it holds them while the
 * pod's containers come and go. It reaps the orphans that land on it (shared PID
 * namespaces) and exits cleanly on SIGINT or SIGTERM, so a pod stops without waiting for
 * a SIGKILL. Built statically: the pause image has no libc and no PATH. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { _exit(sig == SIGTERM || sig == SIGINT ? 0 : 2); }

static void reap(int sig) {
  (void)sig;
  int saved = errno;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  errno = saved;
}

static int on(int sig, void (*handler)(int)) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = handler;
  sa.sa_flags = sig == SIGCHLD ? SA_NOCLDSTOP | SA_RESTART : 0;
  sigemptyset(&sa.sa_mask);
  return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    static const char v[] = "trenv pause 1\n";
    (void)!write(1, v, sizeof(v) - 1);
    return 0;
  }
  if (getpid() != 1) {
    static const char w[] = "pause: not PID 1, reaping only its own children\n";
    (void)!write(2, w, sizeof(w) - 1);
  }
  if (on(SIGINT, stop) || on(SIGTERM, stop) || on(SIGCHLD, reap))
    return 1;
  for (;;)
    pause();
}
