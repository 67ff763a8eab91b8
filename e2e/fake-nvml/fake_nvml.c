/*
 * A FAKE NVIDIA Management Library (libnvidia-ml.so.1) for Strata's e2e
 * tests, benchmarks and demo. Test only; never shipped.
 *
 * It exports the small subset of the NVML C API that Strata uses through the
 * `nvml-wrapper` crate, with the exact symbol names, struct layouts and
 * return codes of nvml.h (as mirrored by nvml-wrapper-sys 0.10). The GPUs it
 * reports are simulated: their load comes from a text file written by the
 * engine simulator, and power, memory, temperature, utilization and energy
 * are derived from that load.
 *
 * Configuration (environment variables, read when the init refcount goes
 * from 0 to 1 in nvmlInit_v2 / nvmlInit / nvmlInitWithFlags):
 *
 *   STRATA_FAKE_NVML_DEVICES          comma-separated GPU UUIDs (at most 16,
 *                                     each at most 79 characters). Unset: one
 *                                     device "GPU-00000000-0000-0000-0000-000000000000".
 *                                     Set but empty: no devices.
 *   STRATA_FAKE_NVML_NAME             product name (default "NVIDIA H100 80GB HBM3").
 *   STRATA_FAKE_NVML_LOAD_FILE        file holding one number, the utilization
 *                                     in [0,1] (clamped); re-read on every
 *                                     query. Unset, missing, unreadable or
 *                                     garbage: utilization 0.
 *   STRATA_FAKE_NVML_IDLE_WATTS       idle power in W (default 70).
 *   STRATA_FAKE_NVML_TDP_WATTS        power at full load in W, and the default
 *                                     and maximum power limit (default 700).
 *   STRATA_FAKE_NVML_MIN_LIMIT_WATTS  the lowest power limit that can be set
 *                                     (default 100).
 *   STRATA_FAKE_NVML_MEMORY_TOTAL_MIB memory total in MiB (default 81559).
 *   STRATA_FAKE_NVML_STATE_FILE       where to persist the energy counters, so
 *                                     that a restarted process continues them.
 *   STRATA_FAKE_NVML_RESET_ENERGY=1   start the counters at 0 even when the
 *                                     state file has some (a driver reload).
 *   STRATA_FAKE_NVML_FAIL_INIT=1      nvmlInit_v2 returns
 *                                     NVML_ERROR_DRIVER_NOT_LOADED (9).
 *   STRATA_FAKE_NVML_GPU_DIR          the node's GPU "hardware" state, one
 *                                     directory per device (per-device mode,
 *                                     below). Wins over LOAD_FILE and
 *                                     STATE_FILE.
 *   NVIDIA_VISIBLE_DEVICES            which of the node's devices this
 *                                     process sees, as the NVIDIA container
 *                                     toolkit arranges it (below).
 *
 * Visibility. STRATA_FAKE_NVML_DEVICES is the node's (host's) list of GPUs.
 * NVIDIA_VISIBLE_DEVICES narrows it the way the container toolkit does:
 *
 *   unset                  every device of STRATA_FAKE_NVML_DEVICES (a
 *                          process on the host);
 *   "all"                  every device;
 *   "none", "void" or ""   no device (nvmlDeviceGetCount returns 0);
 *   a comma list           only the listed devices, each a UUID or an index
 *                          into STRATA_FAKE_NVML_DEVICES, renumbered 0..n-1
 *                          in the listed order (a device listed twice is
 *                          seen once). A UUID or index the node does not
 *                          have makes init fail with NVML_ERROR_UNKNOWN and
 *                          a message on stderr, as a misconfigured driver
 *                          would.
 *
 * Per-device mode (STRATA_FAKE_NVML_GPU_DIR=<dir>). The state of each GPU
 * lives in <dir>/<uuid>/, shared by every process of the node, so that the
 * energy counter belongs to the device, not to the process, as with real
 * hardware:
 *
 *   <dir>/<uuid>/load      one number, the device's utilization in [0,1],
 *                          written by whoever computes on it (the engine
 *                          simulator's --gpu-dir); re-read on every query;
 *                          missing or garbage: 0.
 *   <dir>/<uuid>/energy    one line "<energy_mj> <last_ns> <last_util>": the
 *                          device's counter and its last sample. Missing or
 *                          unreadable: the counter starts from 0 at the next
 *                          sample.
 *   <dir>/<uuid>/power_limit  one number, the power management limit in mW
 *                          that nvmlDeviceSetPowerManagementLimit set (as
 *                          the driver keeps it until reboot); missing or
 *                          garbage: the default (the TDP).
 *   <dir>/<uuid>/lock      every sample locks it (flock, exclusive), reads
 *                          the energy file, integrates, and rewrites it
 *                          (temporary file + rename), so that several
 *                          processes (a node agent, its restart, a sidecar
 *                          that opts in) see one monotonic counter.
 *
 * Directories are created as needed. STRATA_FAKE_NVML_RESET_ENERGY=1 in this
 * mode resets the counter of each visible device to 0 at init (a driver
 * reload). Where the directory cannot be written, the counter falls back to
 * the process's own (from 0 at init).
 *
 * A configuration that cannot be parsed makes init fail with
 * NVML_ERROR_UNKNOWN (999) and a message on stderr.
 *
 * The model, with util the utilization read from the load file:
 *
 *   power (mW)        = min(1000 * (idle + (tdp - idle) * util), limit)
 *                       where limit is the device's power management limit
 *                       (the TDP unless set), as a capped GPU throttles
 *   memory used       = total * (0.1 + 0.8 * util)   (weights + KV cache)
 *   temperature (C)   = 30 + 50 * util
 *   utilization (%)   = gpu: round(100 * util), memory: round(60 * util)
 *   energy (mJ)       = integral of power over wall-clock time
 *
 * Energy is integrated as a left Riemann sum: every query that touches a
 * device (any nvmlDevice* call taking a handle) first adds
 * power(util seen at the previous sample) * (now - previous sample time) to
 * the device's counter, then records the current util and time as the new
 * sample. Time is CLOCK_REALTIME, in nanoseconds, so that the persisted
 * sample time stays meaningful across processes. A clock that went
 * backwards adds nothing.
 *
 * The state file holds one line per device, "<uuid> <energy_mj> <last_ns>
 * <last_util>", and is rewritten (temporary file + rename) after every
 * sample. At init, a device found in it continues from its saved sample
 * (so the time the process was down is integrated at the saved util, as a
 * real driver that kept running would); other devices start at 0. Without a
 * state file, counters start at 0 at init.
 *
 * Power limits. nvmlDeviceSetPowerManagementLimit needs root, as the real
 * library does (NVML_ERROR_NO_PERMISSION otherwise), and a limit within
 * [min limit, TDP] (NVML_ERROR_INVALID_ARGUMENT otherwise); the limit holds
 * from the moment it is set (the interval before it is integrated at the
 * old limit). In per-device mode it lives in <dir>/<uuid>/power_limit and
 * so outlives the process, as a driver keeps it; otherwise it is the
 * process's own. Throughput is not slowed by a cap (the simulator does not
 * model it): only the drawn power is.
 *
 * All entry points take one process-wide mutex.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* nvmlReturn_t values (nvml.h). */
typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

/* nvmlTemperatureSensors_t */
#define NVML_TEMPERATURE_GPU 0

typedef struct nvmlUtilization_st {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct nvmlMemory_st {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct nvmlMemory_v2_st {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

#define NVML_MEMORY_V2_VERSION \
    ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

#define MAX_DEVICES 16
#define UUID_MAX 80 /* NVML_DEVICE_UUID_BUFFER_SIZE, including the NUL */
#define NAME_MAX_LEN 96 /* NVML_DEVICE_NAME_V2_BUFFER_SIZE, including the NUL */
#define PATH_MAX_LEN 4096

#define DRIVER_VERSION "550.54.15"
#define DEFAULT_UUID "GPU-00000000-0000-0000-0000-000000000000"
#define DEFAULT_NAME "NVIDIA H100 80GB HBM3"

struct nvmlDevice_st {
    unsigned int index;
    char uuid[UUID_MAX];
    double energy_mj;        /* integrated energy, fractional mJ kept */
    long long last_ns;       /* CLOCK_REALTIME of the previous sample */
    double last_util;        /* utilization seen at the previous sample */
    double limit_mw;         /* power limit, outside per-device mode */
};
typedef struct nvmlDevice_st *nvmlDevice_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int g_refcount;
static struct nvmlDevice_st g_devices[MAX_DEVICES];
static unsigned int g_count;
static char g_name[NAME_MAX_LEN];
static char g_load_file[PATH_MAX_LEN];
static char g_state_file[PATH_MAX_LEN];
static char g_gpu_dir[PATH_MAX_LEN];
static double g_idle_w;
static double g_tdp_w;
static double g_min_limit_w;
static unsigned long long g_mem_total_mib;

/* ------------------------------------------------------------------------ */
/* Helpers (called with g_lock held)                                         */
/* ------------------------------------------------------------------------ */

static long long now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return 0;
    return (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
}

static int env_flag(const char *name)
{
    const char *v = getenv(name);
    return v != NULL && strcmp(v, "1") == 0;
}

/* Parses a finite, non-negative double from env var `name` into *out, or
 * leaves the default. Returns 0 on success, -1 on a bad value. */
static int env_double(const char *name, double *out)
{
    const char *v = getenv(name);
    char *end;
    double d;
    if (v == NULL || *v == '\0')
        return 0;
    errno = 0;
    d = strtod(v, &end);
    while (*end == ' ' || *end == '\t' || *end == '\n')
        end++;
    if (errno != 0 || end == v || *end != '\0' || !isfinite(d) || d < 0) {
        fprintf(stderr, "fake-nvml: %s must be a non-negative number, got \"%s\"\n", name, v);
        return -1;
    }
    *out = d;
    return 0;
}

static int env_ull(const char *name, unsigned long long *out)
{
    const char *v = getenv(name);
    char *end;
    unsigned long long n;
    if (v == NULL || *v == '\0')
        return 0;
    errno = 0;
    n = strtoull(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || v[0] == '-') {
        fprintf(stderr, "fake-nvml: %s must be a non-negative integer, got \"%s\"\n", name, v);
        return -1;
    }
    *out = n;
    return 0;
}

static int copy_env_string(const char *name, char *dst, size_t cap, const char *dflt)
{
    const char *v = getenv(name);
    if (v == NULL)
        v = dflt;
    if (strlen(v) >= cap) {
        fprintf(stderr, "fake-nvml: %s is too long (at most %zu bytes)\n", name, cap - 1);
        return -1;
    }
    strcpy(dst, v);
    return 0;
}

/* Splits a comma-separated list (blanks around items and empty items
 * ignored) into `out`, at most MAX_DEVICES items of fewer than UUID_MAX
 * bytes; `what` names the variable in messages. Returns the count, or -1. */
static int split_list(const char *v, const char *what, char out[MAX_DEVICES][UUID_MAX])
{
    const char *p = v;
    int n = 0;
    while (*p != '\0') {
        const char *start, *end, *next;
        size_t len;
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        if (*p == '\0')
            break;
        start = p;
        next = strchr(p, ',');
        if (next == NULL)
            next = p + strlen(p);
        end = next;
        while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        len = (size_t)(end - start);
        if (n == MAX_DEVICES) {
            fprintf(stderr, "fake-nvml: %s lists more than %d devices\n", what, MAX_DEVICES);
            return -1;
        }
        if (len >= UUID_MAX) {
            fprintf(stderr, "fake-nvml: device \"%.*s\" in %s is too long\n", (int)len, start, what);
            return -1;
        }
        memcpy(out[n], start, len);
        out[n][len] = '\0';
        n++;
        p = next;
    }
    return n;
}

/* The index of `item` (a UUID, or a decimal index) in the node's list, or -1. */
static int find_host_device(const char *item, char host[MAX_DEVICES][UUID_MAX], int host_n)
{
    char *end;
    long idx;
    int i;
    for (i = 0; i < host_n; i++)
        if (strcmp(host[i], item) == 0)
            return i;
    if (item[0] >= '0' && item[0] <= '9') {
        errno = 0;
        idx = strtol(item, &end, 10);
        if (errno == 0 && *end == '\0' && idx >= 0 && idx < host_n)
            return (int)idx;
    }
    return -1;
}

static void add_device(const char *uuid)
{
    memset(&g_devices[g_count], 0, sizeof(g_devices[g_count]));
    g_devices[g_count].index = g_count;
    strcpy(g_devices[g_count].uuid, uuid);
    g_count++;
}

/* The devices this process sees: the node's (STRATA_FAKE_NVML_DEVICES)
 * narrowed by NVIDIA_VISIBLE_DEVICES (see the header comment). */
static int parse_devices(void)
{
    static char host[MAX_DEVICES][UUID_MAX];
    static char visible[MAX_DEVICES][UUID_MAX];
    const char *v = getenv("STRATA_FAKE_NVML_DEVICES");
    const char *vis = getenv("NVIDIA_VISIBLE_DEVICES");
    int host_n, vis_n, i, j;

    g_count = 0;
    host_n = split_list(v == NULL ? DEFAULT_UUID : v, "STRATA_FAKE_NVML_DEVICES", host);
    if (host_n < 0)
        return -1;
    if (vis == NULL || strcmp(vis, "all") == 0) {
        for (i = 0; i < host_n; i++)
            add_device(host[i]);
        return 0;
    }
    if (vis[0] == '\0' || strcmp(vis, "none") == 0 || strcmp(vis, "void") == 0)
        return 0;
    vis_n = split_list(vis, "NVIDIA_VISIBLE_DEVICES", visible);
    if (vis_n < 0)
        return -1;
    for (i = 0; i < vis_n; i++) {
        int h = find_host_device(visible[i], host, host_n);
        int seen = 0;
        if (h < 0) {
            fprintf(stderr, "fake-nvml: NVIDIA_VISIBLE_DEVICES names \"%s\", which is not a "
                    "UUID or an index of this node's GPUs (STRATA_FAKE_NVML_DEVICES)\n", visible[i]);
            g_count = 0;
            return -1;
        }
        for (j = 0; j < (int)g_count; j++)
            if (strcmp(g_devices[j].uuid, host[h]) == 0)
                seen = 1;
        if (!seen)
            add_device(host[h]);
    }
    return 0;
}

/* The utilization in the load file `path`, in [0,1]; 0 on any problem. */
static double read_util_at(const char *path)
{
    char buf[64];
    FILE *f;
    size_t n;
    char *end;
    double d;
    if (path[0] == '\0')
        return 0.0;
    f = fopen(path, "r");
    if (f == NULL)
        return 0.0;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    d = strtod(buf, &end);
    if (end == buf || !isfinite(d))
        return 0.0;
    while (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r')
        end++;
    if (*end != '\0')
        return 0.0;
    if (d < 0.0)
        return 0.0;
    if (d > 1.0)
        return 1.0;
    return d;
}

/* The process-wide load file's utilization (the mode without a GPU dir). */
static double read_util(void)
{
    return read_util_at(g_load_file);
}

static double device_limit_mw(const struct nvmlDevice_st *d);

/* The power drawn at `util`, capped by the device's power limit. */
static double power_mw(const struct nvmlDevice_st *d, double util)
{
    double p = 1000.0 * (g_idle_w + (g_tdp_w - g_idle_w) * util);
    double limit = device_limit_mw(d);
    return p > limit ? limit : p;
}

static void write_state(void)
{
    char tmp[PATH_MAX_LEN + 32];
    FILE *f;
    unsigned int i;
    if (g_state_file[0] == '\0')
        return;
    snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", g_state_file, (long)getpid());
    f = fopen(tmp, "w");
    if (f == NULL)
        return;
    for (i = 0; i < g_count; i++) {
        const struct nvmlDevice_st *d = &g_devices[i];
        fprintf(f, "%s %.6f %lld %.6f\n", d->uuid, d->energy_mj, d->last_ns, d->last_util);
    }
    if (fclose(f) != 0) {
        unlink(tmp);
        return;
    }
    if (rename(tmp, g_state_file) != 0)
        unlink(tmp);
}

static void read_state(void)
{
    char line[512];
    FILE *f;
    if (g_state_file[0] == '\0')
        return;
    f = fopen(g_state_file, "r");
    if (f == NULL)
        return;
    while (fgets(line, sizeof(line), f) != NULL) {
        char uuid[UUID_MAX];
        double energy, util;
        long long last;
        unsigned int i;
        if (sscanf(line, "%79s %lf %lld %lf", uuid, &energy, &last, &util) != 4)
            continue;
        if (!isfinite(energy) || energy < 0 || !isfinite(util))
            continue;
        for (i = 0; i < g_count; i++) {
            if (strcmp(g_devices[i].uuid, uuid) == 0) {
                g_devices[i].energy_mj = energy;
                g_devices[i].last_ns = last;
                g_devices[i].last_util = util < 0 ? 0 : (util > 1 ? 1 : util);
                break;
            }
        }
    }
    fclose(f);
}

/* ------------------------------------------------------------------------ */
/* Per-device mode: the device's state in <gpu dir>/<uuid>/                  */
/* ------------------------------------------------------------------------ */

/* <gpu dir>/<uuid>/<file> into `out` (PATH_MAX_LEN bytes); -1 if too long. */
static int device_path(const struct nvmlDevice_st *d, const char *file, char *out)
{
    int n = snprintf(out, PATH_MAX_LEN, "%s/%s/%s", g_gpu_dir, d->uuid, file);
    return n < 0 || n >= PATH_MAX_LEN ? -1 : 0;
}

/* Opens and locks (exclusive) the device's lock file, creating the
 * directories on the way. Returns the descriptor, or -1. */
static int lock_device(const struct nvmlDevice_st *d)
{
    char path[PATH_MAX_LEN];
    int fd;
    if (device_path(d, "lock", path) != 0)
        return -1;
    fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0 && errno == ENOENT) {
        char dir[PATH_MAX_LEN];
        snprintf(dir, sizeof(dir), "%s", g_gpu_dir);
        if (mkdir(dir, 0777) == 0)
            chmod(dir, 0777);
        if (device_path(d, "", dir) != 0)
            return -1;
        if (mkdir(dir, 0777) == 0)
            chmod(dir, 0777);
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    }
    if (fd < 0)
        return -1;
    /* The node's processes may run as different users: whoever creates the
     * state leaves it writable to the others (the umask notwithstanding). */
    fchmod(fd, 0666);
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

static void unlock_device(int fd)
{
    flock(fd, LOCK_UN);
    close(fd);
}

/* Reads the device's energy file into `d`. Returns 0, or -1 when it is
 * missing or unreadable (the caller starts the counter from 0). */
static int read_energy_file(struct nvmlDevice_st *d)
{
    char path[PATH_MAX_LEN];
    char line[256];
    double energy, util;
    long long last;
    FILE *f;
    int ok;
    if (device_path(d, "energy", path) != 0)
        return -1;
    f = fopen(path, "r");
    if (f == NULL)
        return -1;
    ok = fgets(line, sizeof(line), f) != NULL
        && sscanf(line, "%lf %lld %lf", &energy, &last, &util) == 3
        && isfinite(energy) && energy >= 0 && isfinite(util);
    fclose(f);
    if (!ok)
        return -1;
    d->energy_mj = energy;
    d->last_ns = last;
    d->last_util = util < 0 ? 0 : (util > 1 ? 1 : util);
    return 0;
}

/* Rewrites the device's energy file from `d` (temporary file + rename;
 * the caller holds the device's lock). */
static void write_energy_file(const struct nvmlDevice_st *d)
{
    char path[PATH_MAX_LEN];
    char tmp[PATH_MAX_LEN + 32];
    FILE *f;
    if (device_path(d, "energy", path) != 0)
        return;
    snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
    f = fopen(tmp, "w");
    if (f == NULL)
        return;
    fchmod(fileno(f), 0666);
    fprintf(f, "%.6f %lld %.6f\n", d->energy_mj, d->last_ns, d->last_util);
    if (fclose(f) != 0) {
        unlink(tmp);
        return;
    }
    if (rename(tmp, path) != 0)
        unlink(tmp);
}

/* The device's power limit in mW: its power_limit file in per-device
 * mode, else the process's own; the TDP when unset or unreadable. */
static double device_limit_mw(const struct nvmlDevice_st *d)
{
    char path[PATH_MAX_LEN];
    char line[64];
    double v;
    FILE *f;
    int ok;
    if (g_gpu_dir[0] == '\0')
        return d->limit_mw > 0 ? d->limit_mw : g_tdp_w * 1000.0;
    if (device_path(d, "power_limit", path) != 0)
        return g_tdp_w * 1000.0;
    f = fopen(path, "r");
    if (f == NULL)
        return g_tdp_w * 1000.0;
    ok = fgets(line, sizeof(line), f) != NULL && sscanf(line, "%lf", &v) == 1
        && isfinite(v) && v > 0;
    fclose(f);
    return ok ? v : g_tdp_w * 1000.0;
}

/* Sets the device's power limit (the caller checked it). Returns 0, or -1
 * when the per-device file cannot be written. */
static int set_device_limit(struct nvmlDevice_st *d, unsigned int limit_mw)
{
    char path[PATH_MAX_LEN];
    char tmp[PATH_MAX_LEN + 32];
    FILE *f;
    int fd;
    if (g_gpu_dir[0] == '\0') {
        d->limit_mw = (double)limit_mw;
        return 0;
    }
    if (device_path(d, "power_limit", path) != 0)
        return -1;
    fd = lock_device(d);
    if (fd < 0)
        return -1;
    snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
    f = fopen(tmp, "w");
    if (f == NULL) {
        unlock_device(fd);
        return -1;
    }
    fchmod(fileno(f), 0666);
    fprintf(f, "%u\n", limit_mw);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        unlock_device(fd);
        return -1;
    }
    unlock_device(fd);
    return 0;
}

/* The device's utilization from its load file. */
static double read_device_util(const struct nvmlDevice_st *d)
{
    char path[PATH_MAX_LEN];
    if (device_path(d, "load", path) != 0)
        return 0.0;
    return read_util_at(path);
}

/* A sample in per-device mode: under the device's lock, continue the
 * counter from the energy file (or from 0), integrate, write it back.
 * Without a usable lock, the process's own counter in `d` goes on. */
static double sample_device(struct nvmlDevice_st *d)
{
    double util = read_device_util(d);
    long long now = now_ns();
    int fd = lock_device(d);
    if (fd >= 0 && read_energy_file(d) != 0) {
        d->energy_mj = 0.0;
        d->last_ns = now;
        d->last_util = util;
    }
    if (now > d->last_ns)
        d->energy_mj += power_mw(d, d->last_util) * (double)(now - d->last_ns) / 1e9;
    d->last_ns = now;
    d->last_util = util;
    if (fd >= 0) {
        write_energy_file(d);
        unlock_device(fd);
    }
    return util;
}

/* A driver reload in per-device mode: the device's counter back to 0. */
static void reset_device(struct nvmlDevice_st *d)
{
    int fd = lock_device(d);
    d->energy_mj = 0.0;
    d->last_ns = now_ns();
    d->last_util = read_device_util(d);
    if (fd >= 0) {
        write_energy_file(d);
        unlock_device(fd);
    }
}

/* Takes a sample for `d`: integrates energy over the elapsed interval at
 * the previous sample's power (left Riemann sum), records the current
 * utilization and time, persists the state. Returns the current util. */
static double sample(struct nvmlDevice_st *d)
{
    double util;
    long long now;
    if (g_gpu_dir[0] != '\0')
        return sample_device(d);
    util = read_util();
    now = now_ns();
    if (now > d->last_ns)
        d->energy_mj += power_mw(d, d->last_util) * (double)(now - d->last_ns) / 1e9;
    d->last_ns = now;
    d->last_util = util;
    write_state();
    return util;
}

static int valid_device(nvmlDevice_t device)
{
    unsigned int i;
    for (i = 0; i < g_count; i++)
        if (device == &g_devices[i])
            return 1;
    return 0;
}

static unsigned int round_pct(double x)
{
    return (unsigned int)lround(x);
}

/* Copies `s` into an NVML string out-parameter. */
static nvmlReturn_t copy_out(const char *s, char *buf, unsigned int length)
{
    size_t n = strlen(s);
    if (buf == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((size_t)length < n + 1)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, s, n + 1);
    return NVML_SUCCESS;
}

#define LOCK() pthread_mutex_lock(&g_lock)
#define UNLOCK() pthread_mutex_unlock(&g_lock)

/* Locks, checks init and the device handle; on failure unlocks and returns. */
#define ENTER_DEVICE(device)                         \
    do {                                             \
        LOCK();                                      \
        if (g_refcount == 0) {                       \
            UNLOCK();                                \
            return NVML_ERROR_UNINITIALIZED;         \
        }                                            \
        if (!valid_device(device)) {                 \
            UNLOCK();                                \
            return NVML_ERROR_INVALID_ARGUMENT;      \
        }                                            \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Init and shutdown                                                        */
/* ------------------------------------------------------------------------ */

static nvmlReturn_t init_locked(void)
{
    long long now;
    unsigned int i;

    if (g_refcount > 0) {
        g_refcount++;
        return NVML_SUCCESS;
    }
    if (env_flag("STRATA_FAKE_NVML_FAIL_INIT"))
        return NVML_ERROR_DRIVER_NOT_LOADED;

    g_idle_w = 70.0;
    g_tdp_w = 700.0;
    g_min_limit_w = 100.0;
    g_mem_total_mib = 81559;
    if (parse_devices() != 0
        || copy_env_string("STRATA_FAKE_NVML_NAME", g_name, sizeof(g_name), DEFAULT_NAME) != 0
        || copy_env_string("STRATA_FAKE_NVML_LOAD_FILE", g_load_file, sizeof(g_load_file), "") != 0
        || copy_env_string("STRATA_FAKE_NVML_STATE_FILE", g_state_file, sizeof(g_state_file), "") != 0
        || copy_env_string("STRATA_FAKE_NVML_GPU_DIR", g_gpu_dir, sizeof(g_gpu_dir), "") != 0
        || env_double("STRATA_FAKE_NVML_IDLE_WATTS", &g_idle_w) != 0
        || env_double("STRATA_FAKE_NVML_TDP_WATTS", &g_tdp_w) != 0
        || env_double("STRATA_FAKE_NVML_MIN_LIMIT_WATTS", &g_min_limit_w) != 0
        || env_ull("STRATA_FAKE_NVML_MEMORY_TOTAL_MIB", &g_mem_total_mib) != 0) {
        g_count = 0;
        return NVML_ERROR_UNKNOWN;
    }
    if (g_tdp_w < g_idle_w) {
        fprintf(stderr, "fake-nvml: STRATA_FAKE_NVML_TDP_WATTS (%g) is below "
                "STRATA_FAKE_NVML_IDLE_WATTS (%g)\n", g_tdp_w, g_idle_w);
        g_count = 0;
        return NVML_ERROR_UNKNOWN;
    }

    if (g_gpu_dir[0] != '\0') {
        for (i = 0; i < g_count; i++) {
            if (strchr(g_devices[i].uuid, '/') != NULL || g_devices[i].uuid[0] == '.') {
                fprintf(stderr, "fake-nvml: device UUID \"%s\" cannot name a directory of "
                        "STRATA_FAKE_NVML_GPU_DIR\n", g_devices[i].uuid);
                g_count = 0;
                return NVML_ERROR_UNKNOWN;
            }
        }
    }

    now = now_ns();
    for (i = 0; i < g_count; i++) {
        g_devices[i].energy_mj = 0.0;
        g_devices[i].last_ns = now;
        g_devices[i].limit_mw = g_tdp_w * 1000.0;
        g_devices[i].last_util = g_gpu_dir[0] != '\0' ? read_device_util(&g_devices[i]) : read_util();
    }
    if (g_gpu_dir[0] != '\0') {
        /* The counters live in the GPU dir; a reset is a driver reload. */
        if (env_flag("STRATA_FAKE_NVML_RESET_ENERGY"))
            for (i = 0; i < g_count; i++)
                reset_device(&g_devices[i]);
    } else {
        if (!env_flag("STRATA_FAKE_NVML_RESET_ENERGY"))
            read_state();
        write_state();
    }
    g_refcount = 1;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInit_v2(void)
{
    nvmlReturn_t r;
    LOCK();
    r = init_locked();
    UNLOCK();
    return r;
}

EXPORT nvmlReturn_t nvmlInit(void)
{
    return nvmlInit_v2();
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return nvmlInit_v2();
}

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t r = NVML_SUCCESS;
    LOCK();
    if (g_refcount == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else
        g_refcount--;
    UNLOCK();
    return r;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Unknown Error";
    }
}

/* ------------------------------------------------------------------------ */
/* System queries                                                           */
/* ------------------------------------------------------------------------ */

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t r;
    LOCK();
    r = g_refcount == 0 ? NVML_ERROR_UNINITIALIZED : copy_out(DRIVER_VERSION, version, length);
    UNLOCK();
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t r = NVML_SUCCESS;
    LOCK();
    if (g_refcount == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else if (deviceCount == NULL)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else
        *deviceCount = g_count;
    UNLOCK();
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t r = NVML_SUCCESS;
    LOCK();
    if (g_refcount == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else if (device == NULL || index >= g_count)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else
        *device = &g_devices[index];
    UNLOCK();
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    nvmlReturn_t r = NVML_ERROR_NOT_FOUND;
    unsigned int i;
    LOCK();
    if (g_refcount == 0) {
        r = NVML_ERROR_UNINITIALIZED;
    } else if (uuid == NULL || device == NULL) {
        r = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        for (i = 0; i < g_count; i++) {
            if (strcmp(g_devices[i].uuid, uuid) == 0) {
                *device = &g_devices[i];
                r = NVML_SUCCESS;
                break;
            }
        }
    }
    UNLOCK();
    return r;
}

/* ------------------------------------------------------------------------ */
/* Device queries                                                           */
/* ------------------------------------------------------------------------ */

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    nvmlReturn_t r;
    ENTER_DEVICE(device);
    sample(device);
    r = copy_out(device->uuid, uuid, length);
    UNLOCK();
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    nvmlReturn_t r;
    ENTER_DEVICE(device);
    sample(device);
    r = copy_out(g_name, name, length);
    UNLOCK();
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    ENTER_DEVICE(device);
    if (index == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    sample(device);
    *index = device->index;
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    double util;
    ENTER_DEVICE(device);
    if (utilization == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    util = sample(device);
    utilization->gpu = round_pct(util * 100.0);
    utilization->memory = round_pct(util * 60.0);
    UNLOCK();
    return NVML_SUCCESS;
}

static void memory_now(double util, unsigned long long *total, unsigned long long *used)
{
    *total = g_mem_total_mib * 1024ULL * 1024ULL;
    *used = (unsigned long long)((double)*total * (0.1 + 0.8 * util));
    if (*used > *total)
        *used = *total;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    unsigned long long total, used;
    ENTER_DEVICE(device);
    if (memory == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if ((memory->version >> 24) != 2) {
        UNLOCK();
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    memory_now(sample(device), &total, &used);
    memory->total = total;
    memory->reserved = 0;
    memory->used = used;
    memory->free = total - used;
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    unsigned long long total, used;
    ENTER_DEVICE(device);
    if (memory == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    memory_now(sample(device), &total, &used);
    memory->total = total;
    memory->used = used;
    memory->free = total - used;
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    ENTER_DEVICE(device);
    if (power == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *power = (unsigned int)llround(power_mw(device, sample(device)));
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    ENTER_DEVICE(device);
    if (limit == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    /* A limit does not depend on the load: no sample (a reader of limits
     * must not move the energy counter under a reader of energy). */
    *limit = (unsigned int)llround(device_limit_mw(device));
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    ENTER_DEVICE(device);
    if (limit == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *limit = (unsigned int)llround(device_limit_mw(device));
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device, unsigned int *limit)
{
    ENTER_DEVICE(device);
    if (limit == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *limit = (unsigned int)llround(g_tdp_w * 1000.0);
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device,
    unsigned int *min_limit, unsigned int *max_limit)
{
    ENTER_DEVICE(device);
    if (min_limit == NULL || max_limit == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *min_limit = (unsigned int)llround(g_min_limit_w * 1000.0);
    *max_limit = (unsigned int)llround(g_tdp_w * 1000.0);
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit)
{
    ENTER_DEVICE(device);
    if (geteuid() != 0) {
        UNLOCK();
        return NVML_ERROR_NO_PERMISSION;
    }
    if ((double)limit < g_min_limit_w * 1000.0 - 0.5 || (double)limit > g_tdp_w * 1000.0 + 0.5) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    /* What was drawn until now, at the old limit. */
    sample(device);
    if (set_device_limit(device, limit) != 0) {
        UNLOCK();
        return NVML_ERROR_UNKNOWN;
    }
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    ENTER_DEVICE(device);
    if (energy == NULL) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    sample(device);
    *energy = (unsigned long long)device->energy_mj;
    UNLOCK();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensorType, unsigned int *temp)
{
    double util;
    ENTER_DEVICE(device);
    if (temp == NULL || sensorType != NVML_TEMPERATURE_GPU) {
        UNLOCK();
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    util = sample(device);
    *temp = (unsigned int)lround(30.0 + 50.0 * util);
    UNLOCK();
    return NVML_SUCCESS;
}
