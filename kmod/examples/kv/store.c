#include <string.h>

struct entry {
    char key[32];
    char value[32];
};

static struct entry table[64];
static long misses;

static unsigned hash(const char *key)
{
    unsigned h = 5381;
    while (*key)
        h = h * 33 + (unsigned char)*key++;
    return h % 64;
}

const char *kv_get(const char *key)
{
    struct entry *e = &table[hash(key)];
    if (strcmp(e->key, key) != 0) {
        misses++;
        return NULL; /* BUG: callers print the result; a miss must return "" */
    }
    return e->value;
}

void kv_put(const char *key, const char *value)
{
    struct entry *e = &table[hash(key)];
    strncpy(e->key, key, sizeof e->key - 1);
    strncpy(e->value, value, sizeof e->value - 1);
}
