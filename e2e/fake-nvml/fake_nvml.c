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
 *   STRATA_FAKE_NVML_TDP_WATTS        power at full load in W, and the enforced
 *                                     power limit (default 700).
 *   STRATA_FAKE_NVML_MEMORY_TOTAL_MIB memory total in MiB (default 81559).
 *   STRATA_FAKE_NVML_STATE_FILE       where to persist the energy counters, so
 *                                     that a restarted process continues them.
 *   STRATA_FAKE_NVML_RESET_ENERGY=1   start the counters at 0 even when the
 *                                     state file has some (a driver reload).
 *   STRATA_FAKE_NVML_FAIL_INIT=1      nvmlInit_v2 returns
 *                                     NVML_ERROR_DRIVER_NOT_LOADED (9).
 *
 * A configuration that cannot be parsed makes init fail with
 * NVML_ERROR_UNKNOWN (999) and a message on stderr.
 *
 * The model, with util the utilization read from the load file:
 *
 *   power (mW)        = 1000 * (idle + (tdp - idle) * util)
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
 * All entry points take one process-wide mutex.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* nvmlReturn_t values (nvml.h). */
typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
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
};
typedef struct nvmlDevice_st *nvmlDevice_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int g_refcount;
static struct nvmlDevice_st g_devices[MAX_DEVICES];
static unsigned int g_count;
static char g_name[NAME_MAX_LEN];
static char g_load_file[PATH_MAX_LEN];
static char g_state_file[PATH_MAX_LEN];
static double g_idle_w;
static double g_tdp_w;
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

static int parse_devices(void)
{
    const char *v = getenv("STRATA_FAKE_NVML_DEVICES");
    const char *p;
    g_count = 0;
    if (v == NULL)
        v = DEFAULT_UUID;
    p = v;
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
        if (g_count == MAX_DEVICES) {
            fprintf(stderr, "fake-nvml: STRATA_FAKE_NVML_DEVICES lists more than %d devices\n",
                    MAX_DEVICES);
            return -1;
        }
        if (len >= UUID_MAX) {
            fprintf(stderr, "fake-nvml: device UUID \"%.*s\" is too long\n", (int)len, start);
            return -1;
        }
        memset(&g_devices[g_count], 0, sizeof(g_devices[g_count]));
        g_devices[g_count].index = g_count;
        memcpy(g_devices[g_count].uuid, start, len);
        g_devices[g_count].uuid[len] = '\0';
        g_count++;
        p = next;
    }
    return 0;
}

/* The current utilization from the load file, in [0,1]; 0 on any problem. */
static double read_util(void)
{
    char buf[64];
    FILE *f;
    size_t n;
    char *end;
    double d;
    if (g_load_file[0] == '\0')
        return 0.0;
    f = fopen(g_load_file, "r");
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

static double power_mw(double util)
{
    return 1000.0 * (g_idle_w + (g_tdp_w - g_idle_w) * util);
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

/* Takes a sample for `d`: integrates energy over the elapsed interval at
 * the previous sample's power (left Riemann sum), records the current
 * utilization and time, persists the state. Returns the current util. */
static double sample(struct nvmlDevice_st *d)
{
    double util = read_util();
    long long now = now_ns();
    if (now > d->last_ns)
        d->energy_mj += power_mw(d->last_util) * (double)(now - d->last_ns) / 1e9;
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
    g_mem_total_mib = 81559;
    if (parse_devices() != 0
        || copy_env_string("STRATA_FAKE_NVML_NAME", g_name, sizeof(g_name), DEFAULT_NAME) != 0
        || copy_env_string("STRATA_FAKE_NVML_LOAD_FILE", g_load_file, sizeof(g_load_file), "") != 0
        || copy_env_string("STRATA_FAKE_NVML_STATE_FILE", g_state_file, sizeof(g_state_file), "") != 0
        || env_double("STRATA_FAKE_NVML_IDLE_WATTS", &g_idle_w) != 0
        || env_double("STRATA_FAKE_NVML_TDP_WATTS", &g_tdp_w) != 0
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

    now = now_ns();
    for (i = 0; i < g_count; i++) {
        g_devices[i].energy_mj = 0.0;
        g_devices[i].last_ns = now;
        g_devices[i].last_util = read_util();
    }
    if (!env_flag("STRATA_FAKE_NVML_RESET_ENERGY"))
        read_state();
    write_state();
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
    *power = (unsigned int)llround(power_mw(sample(device)));
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
    sample(device);
    *limit = (unsigned int)llround(g_tdp_w * 1000.0);
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
