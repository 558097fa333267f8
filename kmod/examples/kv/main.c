#include <stdio.h>
#include <unistd.h>

const char *kv_get(const char *key);
void kv_put(const char *key, const char *value);

int main(void)
{
    kv_put("apple", "red");
    for (;;) {
        printf("apple=%s pear=%s\n", kv_get("apple"), kv_get("pear"));
        sleep(1);
    }
}
